"""Ray Serve: a pool of named generators (OpenAI chat completions) and VLFeedback judges.

protocol  wire formats, request validation, images, errors (4xx)
rubric    the three-aspect rubric prompts and the strict reply parser
backends  hf, vllm (a Ray Serve LLM engine, llm.py), openai, reference behind one interface
generator, judge   the deployments (@serve.batch, backpressure, health checks)
app       the ingress and application, start(), Ray Serve's config file
client    the Ray Data helper: a dataset of requests through a deployment handle
"""
