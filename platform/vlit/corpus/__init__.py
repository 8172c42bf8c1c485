"""The corpus data plane: ingest, versioning, tasks and templates, sampling, streaming."""
