"""Build, export and reload models of the families vlit trains (vlit/model/families.py)
and their processors.

`model.preset: tiny-qwen2.5-vl` / `tiny-qwen3-vl` build tiny Qwen-VL models over the real
Qwen3 tokenizer (vlit/model/qwen.py). `model.preset: tiny` builds a small LLaVA from config (CLIP vision tower + MLP projector +
Llama LLM, hidden 128, 2 layers, 32 px images, patch 8) with the offline BPE tokenizer: the
same code paths as a real LLaVA-1.5, in seconds on a CPU. `model.path` loads real weights
in Hugging Face format from a folder or an s3:// URI (copied to a local cache first,
because `from_pretrained` reads local files).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlit import storage
from vlit.config import Config, ModelConfig
from vlit.model import qwen
from vlit.model.families import LLAVA, family_of
from vlit.model.tokenizer import build_tiny_tokenizer

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_HIDDEN = 128
TINY_LAYERS = 2
TINY_HEADS = 4
# Where s3:// models are copied before `from_pretrained` (one folder per URI).
MODEL_CACHE = os.environ.get("VLIT_MODEL_CACHE", os.path.expanduser("~/.cache/vlit/models"))


def tiny_processor(image_size: int = TINY_IMAGE_SIZE, patch_size: int = TINY_PATCH_SIZE) -> LlavaProcessor:
    """A LLaVA-1.5-style processor over the offline tokenizer. `<image>` expands to
    (image_size / patch_size)^2 tokens: +1 for CLIP's CLS token, -1 because the "default"
    feature strategy drops it again, exactly as LLaVA-1.5 counts them."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _tiny_config(cfg: ModelConfig, processor: LlavaProcessor) -> LlavaConfig:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE,
        projection_dim=TINY_HIDDEN,
    )
    text = LlamaConfig(
        hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_HEADS, vocab_size=len(tokenizer),
        max_position_embeddings=resolved(cfg).max_len, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
        vision_feature_layer=-2 if cfg.vision_feature_layer is None else cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def local_copy(uri: str) -> str:
    """A local folder holding the files under `uri`: the folder itself, or a cached copy of
    an s3:// prefix. The copy is written to a temp folder and renamed, so a crashed
    download never looks complete. The cache key covers each object's name, size and
    modification time, so a model re-exported to the same URI is fetched again, never
    served stale from the cache (S3 keeps modification times to the second: a same-size
    re-export within the same second would still match)."""
    if not storage.is_s3(uri):
        return storage.normalize(uri)
    root = storage.normalize(uri)
    infos = storage.list_file_infos(root)
    listing = [root] + [f"{u}\t{size}\t{mtime}" for u, size, mtime in infos]
    dest = os.path.join(MODEL_CACHE, hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16])
    if os.path.isdir(dest):
        return dest
    os.makedirs(MODEL_CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=MODEL_CACHE, prefix=".partial-")
    for file_uri, _, _ in infos:
        target = os.path.join(tmp, file_uri[len(root) + 1:])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(storage.read_bytes(file_uri))
    os.replace(tmp, dest)
    return dest


TINY_MAX_LEN = {"tiny": 512, "tiny-qwen2.5-vl": 1024, "tiny-qwen3-vl": 1024}


@functools.lru_cache(maxsize=16)
def _context_length(preset: str | None, path: str | None) -> int:
    if preset is not None:
        return TINY_MAX_LEN[preset]
    folder = local_copy(path)
    config = AutoConfig.from_pretrained(folder)
    length = getattr(getattr(config, "text_config", config), "max_position_embeddings", None) or 2048
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(tokenizer_config):
        limit = json.load(open(tokenizer_config)).get("model_max_length")
        if isinstance(limit, int) and limit < 1_000_000:  # tokenizers without one say 1e30
            length = min(length, limit)
    return int(length)


def resolved(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with `max_len` filled in from the model when it is None (config.py)."""
    if cfg.max_len is not None:
        return cfg
    return cfg.model_copy(update={"max_len": _context_length(cfg.preset, cfg.path)})


def load_processor(path: str):
    """The processor of a checkpoint folder: LLaVA's through the Auto class, Qwen-VL's
    without its video processor (vlit/model/qwen.py)."""
    family = family_of(AutoConfig.from_pretrained(path))
    processor = AutoProcessor.from_pretrained(path) if family == LLAVA else qwen.load_processor(path, family)
    processor.checkpoint_tokenizer_config = _kept_tokenizer_keys(path)
    return processor


# transformers 5 loads a LLaVA folder's tokenizer as the generic TokenizersBackend (the
# llava model type maps to no tokenizer class), which reads tokenizer.json as it is, and
# saves `tokenizer_class: TokenizersBackend` without `legacy`: other tools could not load
# the export, and LlamaTokenizer would load it in the other legacy mode (other ids).
# The export keeps these keys of the checkpoint's tokenizer_config.json.
KEPT_TOKENIZER_KEYS = ("tokenizer_class", "legacy")


def _kept_tokenizer_keys(path: str) -> dict:
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(config):
        return {}
    with open(config) as f:
        data = json.load(f)
    return {k: data[k] for k in KEPT_TOKENIZER_KEYS if k in data}


def build_processor(cfg: ModelConfig):
    """The processor alone (data workers need it, not the weights)."""
    if cfg.preset == "tiny":
        return tiny_processor()
    if cfg.preset in qwen.TINY:
        return qwen.tiny_processor(cfg.preset, cfg.tokenizer)
    return load_processor(local_copy(cfg.path))


def model_config(cfg: ModelConfig):
    """The model's config, without its weights (what rope positions and checks need)."""
    if cfg.preset == "tiny":
        return _tiny_config(cfg, tiny_processor())
    if cfg.preset in qwen.TINY:
        return qwen.tiny_config(cfg.preset, cfg.tokenizer, resolved(cfg).max_len, cfg.attn_implementation)
    return AutoConfig.from_pretrained(local_copy(cfg.path))


def build_model_and_processor(cfg: ModelConfig):
    processor = build_processor(cfg)
    if cfg.preset is not None:
        torch.manual_seed(0)  # the same tiny weights in every process: ranks start identical
        model = (LlavaForConditionalGeneration if cfg.preset == "tiny" else qwen.model_class(cfg.preset))(model_config(cfg))
        return model.to(getattr(torch, cfg.dtype)), processor
    path = local_copy(cfg.path)
    kwargs = {"dtype": getattr(torch, cfg.dtype), "attn_implementation": cfg.attn_implementation}
    # LLaVA checkpoints by their own class; the Qwen-VL line through the Auto class that
    # maps their config to a model.
    family = family_of(AutoConfig.from_pretrained(path))
    if cfg.vision_feature_layer is not None and family != LLAVA:
        raise ValueError(f"model.vision_feature_layer is LLaVA's setting; {family} has none (leave it null)")
    if family != LLAVA:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs), processor
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    if cfg.vision_feature_layer is not None:  # honoured over the checkpoint's own
        model.config.vision_feature_layer = cfg.vision_feature_layer
    return model, processor


def initial_model(cfg: Config):
    """(model, processor) a training stage starts from: `train.init_from` (an earlier
    stage's export) when set, else `model.*`."""
    model_cfg = cfg.model
    if cfg.train is not None and cfg.train.init_from:
        model_cfg = model_cfg.model_copy(update={"preset": None, "path": cfg.train.init_from})
    return build_model_and_processor(model_cfg)


def export_model(model, processor, uri: str, template: str | None = None) -> None:
    """`save_pretrained` (safetensors) of model and processor to a folder or s3:// prefix.
    A tokenizer without a chat template gets `template`'s (model/templates.py), so the
    export formats prompts as it was trained wherever it is loaded; a processor from a
    checkpoint folder keeps its tokenizer class (KEPT_TOKENIZER_KEYS)."""
    from vlit.model.templates import CHAT_TEMPLATES

    if template in CHAT_TEMPLATES and not getattr(processor, "chat_template", None):
        processor.chat_template = processor.tokenizer.chat_template = CHAT_TEMPLATES[template]
    if not storage.is_s3(uri):
        folder = storage.normalize(uri)
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        kept = getattr(processor, "checkpoint_tokenizer_config", None)
        if kept:
            config = os.path.join(folder, "tokenizer_config.json")
            with open(config) as f:
                data = json.load(f)
            with open(config, "w") as f:
                json.dump({**data, **kept}, f, indent=2, ensure_ascii=False)
        return
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, processor, tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(uri, name), f.read())


def load_exported(uri: str):
    """(model, processor) of an export: the model through transformers' Auto class, the
    processor as `load_processor` loads it."""
    path = local_copy(uri)
    return AutoModelForImageTextToText.from_pretrained(path), load_processor(path)
