"""One pydantic schema for every vlit config: YAML files plus dotted overrides.

`load_config("configs/demo.yaml", ["corpus.tasks.cap=10000"])` validates everything
before any work starts; an unknown key, a wrong type or a missing required value raises
`ConfigError` whose message names the key's dotted path.
"""
from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that does not validate; the message names each offending key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    name: str = "vlit"
    seed: int = 0
    # Local scratch space (embedded Ray's temp dir, caches); never a data location.
    workdir: str = ".vlit"


class StorageConfig(_Strict):
    """Where S3 lives. Credentials are deliberately absent: they come from the standard
    AWS environment variables or a named profile, so no config file or tracked param
    can carry a key."""

    endpoint_url: str | None = None  # an S3-compatible store; else AWS_ENDPOINT_URL
    region: str | None = None
    profile: str | None = None


class RayConfig(_Strict):
    # None: start an embedded local Ray; "auto" or ray://host:port joins a cluster.
    address: str | None = None
    # Logical CPUs of an embedded Ray. More than the cores on purpose: train workers that
    # take every CPU starve the Ray Data tasks feeding them (the stream stalls).
    num_cpus: int | None = None
    object_store_mb: int = Field(default=1024, ge=128)
    include_dashboard: bool = False
    # Ray Data: target block size and the number of rows per read task.
    target_max_block_mb: int = Field(default=32, ge=1)


class SynthConfig(_Strict):
    instances: int = Field(default=2000, ge=1)
    tasks: int = Field(default=187, ge=1)
    image_pool: int = Field(default=256, ge=1)  # distinct images the rows draw from
    image_size: int = Field(default=64, ge=16)
    templates_per_task: int = Field(default=3, ge=1)
    seed: int = 0


class PrepareConfig(_Strict):
    sources: list[str] = Field(default_factory=list)
    format: Literal["vision-flan", "vision-flan-raw", "llava"] = "vision-flan"
    # Relative image paths resolve against this; default: each source file's folder.
    image_root: str | None = None
    image_check: Literal["exists", "header", "decode"] = "header"
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    shard_rows: int = Field(default=200_000, ge=1)
    image_check_threads: int = Field(default=16, ge=1)
    # Task name for formats that carry none (LLaVA-Instruct).
    default_task: str = "llava_instruct"


class TasksConfig(_Strict):
    """Task-balanced sampling and instruction templates."""

    cap: int | None = Field(default=None, ge=1)  # at most this many rows per task per epoch
    temperature: float = Field(default=1.0, gt=0.0)  # p(task) ∝ n^(1/T); T=1 keeps proportions
    templates: str | None = None  # YAML: task -> list of instruction templates
    seed: int = 0


class StreamConfig(_Strict):
    image_size: int = Field(default=336, ge=8)
    batch_size: int = Field(default=32, ge=1)  # rows per batch handed to the consumer
    # Rows per decode block (one Ray task's unit of work). Larger blocks amortize Ray's
    # per-task overhead (64 -> 256 rows measured ~1.4x faster); each block holds
    # block_rows * image_size^2 * 3 bytes of pixels.
    block_rows: int = Field(default=256, ge=1)
    # Parallel image-decode tasks; bounded so a 2-core machine keeps a CPU for the consumer.
    decode_concurrency: int = Field(default=2, ge=1)
    # Rows whose image fails to decode while streaming go here (default: under the corpus).
    quarantine: str | None = None


class CorpusConfig(_Strict):
    out: str  # where corpus versions live: OUT/<digest>/
    synth: SynthConfig | None = None
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)


class ModelConfig(_Strict):
    """A LLaVA-architecture model: `preset: tiny` builds one from config (CPU tests, the
    demo); `path` loads real weights in Hugging Face format from a folder or s3:// URI."""

    preset: Literal["tiny"] | None = "tiny"
    path: str | None = None
    template: Literal["vicuna_v1", "plain"] = "vicuna_v1"
    max_len: int = Field(default=512, ge=16)
    vision_feature_layer: int = -2
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of model.preset and model.path")
        return self


class LossConfig(_Strict):
    # response: only assistant turns are supervised. l2t: instruction tokens too, except
    # the system prompt, role tags and task-template text (L2T).
    target: Literal["response", "l2t"] = "response"
    # A sentence is task-template text when it appears in at least this fraction of a
    # task's rows (and the task has at least template_min_rows rows).
    template_min_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    template_min_rows: int = Field(default=4, ge=2)


class LoraConfig(_Strict):
    enabled: bool = False
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(_Strict):
    output: str  # checkpoints and the stage's HF export: OUTPUT/checkpoints, OUTPUT/export
    init_from: str | None = None  # an earlier stage's export (stage 2 starts from stage 1's)
    trainable: list[Literal["vision", "projector", "llm"]] = Field(default_factory=lambda: ["projector", "llm"])
    lora: LoraConfig = Field(default_factory=LoraConfig)
    zero_stage: Literal[0, 1, 2, 3] = 2  # configs/deepspeed/zero{N}.json
    lr: float = Field(default=2e-5, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    micro_batch_size: int = Field(default=4, ge=1)  # packed sequences (or rows) per worker step
    grad_accum: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    packing: bool = True
    group_by_modality_length: bool = True
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    checkpoint_every: int = Field(default=50, ge=1)  # steps
    max_failures: int = Field(default=1, ge=0)
    seed: int = 0


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    corpus: CorpusConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig | None = None  # absent: the job prepares and streams data only


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        lines.append(f"  {path}: {e['msg']}{got}")
    return "invalid config:\n" + "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (numbers, null, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(where + _format_errors(e)) from None
    apply_storage(config.storage)
    return config


def apply_storage(storage: StorageConfig) -> None:
    """Make the storage settings visible to pyarrow, boto3 and Ray workers alike."""
    if storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = storage.endpoint_url
    if storage.region:
        os.environ["AWS_REGION"] = storage.region
    if storage.profile:
        os.environ["AWS_PROFILE"] = storage.profile
