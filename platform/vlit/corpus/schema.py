"""The canonical row schema every source format is normalized into.

One schema for Vision-Flan (both release formats), LLaVA-Instruct and the synthetic
corpus, so everything downstream (sampling, templates, tokenization) reads one shape.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# Placeholder for the image in a user turn (LLaVA convention).
IMAGE_TOKEN = "<image>"

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])

CORPUS_SCHEMA = pa.schema(
    [
        # Stable row key: 16 hex digits of a hash of (source id, image reference, task).
        # Source ids are not unique across the Vision-Flan release, so the id alone is not a key.
        pa.field("key", pa.string(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        # Source dataset (Vision-Flan: the part of the task name before '+').
        pa.field("dataset", pa.string()),
        # Absolute image URI (a local path or s3://...); null for text-only rows.
        pa.field("image", pa.string()),
        # Conversation: roles "user" / "assistant"; the first user turn holds IMAGE_TOKEN
        # exactly when `image` is set.
        pa.field("turns", pa.list_(TURN), nullable=False),
        # Raw-format fields, kept so a task's instruction templates can re-render the row.
        pa.field("input_text", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        # Provenance: the source file URI and the row's position in it.
        pa.field("source", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
    ],
    metadata={"vlit.schema_version": str(SCHEMA_VERSION)},
)

# Rejected rows go to a quarantine of QUARANTINE_SCHEMA (vlit/versions.py), with one of these.
# Quarantine reasons. One name each, used by prepare, streaming and the summaries.
REASONS = (
    "unparseable",          # not JSON, or a JSON value that is not an object
    "missing_fields",       # a required field absent, null or of the wrong type
    "empty_conversation",   # no turns, or no assistant reply
    "image_token_without_image",
    "image_without_token",
    "image_missing",
    "image_undecodable",
    "image_path_escapes_root",
    "duplicate_key",
    # Found while encoding rows for training (vlit.model.labels):
    "bad_turns",              # roles out of order for the chat template
    "multiple_image_tokens",  # more <image> tokens than the row has images
    "tokenization_mismatch",  # per-turn and whole-conversation tokenization disagree
    "too_long",               # longer than model.max_len after image-token expansion
    "no_supervised_tokens",   # the label mask would supervise nothing
)
