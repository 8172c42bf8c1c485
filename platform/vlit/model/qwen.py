"""The Qwen-VL family (Qwen2.5-VL, Qwen3-VL): tiny models built from config over the real
Qwen3 tokenizer, and processors for image corpora.

A Qwen-VL checkpoint's processor class insists on a video processor, and that needs
torchvision (not in the CPU set; it is in the GPU image). An image corpus needs the
image processor (`Qwen2VLImageProcessorPil`: dynamic resolution, `image_grid_thw`, min
and max pixels) and the tokenizer only, so `load_processor` builds the family's processor
from those two, the checkpoint's chat template included, whatever is installed.
"""
from __future__ import annotations

import os

from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from vlit.model.families import QWEN2_5_VL, QWEN3_VL

TINY = {"tiny-qwen2.5-vl": QWEN2_5_VL, "tiny-qwen3-vl": QWEN3_VL}
TINY_HIDDEN, TINY_LAYERS, TINY_HEADS = 128, 2, 4
# The token ids of Qwen's vision markup in its tokenizer (`<|image_pad|>` and the rest).
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

# The ChatML layout Qwen-VL checkpoints ship as their chat template: a default system
# turn, each message between <|im_start|>role and <|im_end|>, each image as
# <|vision_start|><|image_pad|><|vision_end|> where the message has it. The tiny presets
# carry it; a real checkpoint's own template is used as it is.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _image_only(base: type[ProcessorMixin], family: str) -> type[ProcessorMixin]:
    class ImageProcessorOnly(base):
        """`base` without its video processor (module doc)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.family, self.video_processor = family, None
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    ImageProcessorOnly.__name__ = base.__name__
    return ImageProcessorOnly


PROCESSORS = {QWEN2_5_VL: _image_only(Qwen2_5_VLProcessor, QWEN2_5_VL), QWEN3_VL: _image_only(Qwen3VLProcessor, QWEN3_VL)}


def image_processor(patch_size: int, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels)


def load_processor(path: str, family: str):
    """The family's processor from a checkpoint folder (tokenizer, preprocessor_config.json,
    chat template), without a video processor."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    images = Qwen2VLImageProcessorPil.from_pretrained(path)
    template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            import json

            text = open(file).read()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return PROCESSORS[family](image_processor=images, tokenizer=tokenizer, chat_template=template)


def model_class(preset: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if TINY[preset] == QWEN2_5_VL else Qwen3VLForConditionalGeneration


def _tokenizer(preset: str, tokenizer_dir: str | None):
    if tokenizer_dir is None:
        raise ValueError(f"model.preset {preset} needs model.tokenizer: a folder with the Qwen3 tokenizer "
                         "(../shared/tokenizers/qwen3)")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _patch(preset: str) -> int:
    return 14 if TINY[preset] == QWEN2_5_VL else 16


def tiny_processor(preset: str, tokenizer_dir: str | None):
    """The tiny preset's processor: the real tokenizer, images of 4 to 64 patches (a few
    dozen tokens, at the aspect ratio they have), Qwen-VL's chat template."""
    patch = _patch(preset)
    return PROCESSORS[TINY[preset]](image_processor=image_processor(patch, 4 * patch * patch, 64 * patch * patch),
                                    tokenizer=_tokenizer(preset, tokenizer_dir), chat_template=CHAT_TEMPLATE)


def tiny_config(preset: str, tokenizer_dir: str | None, max_len: int, attn: str):
    """A Qwen2.5-VL or Qwen3-VL of a few layers over the real Qwen3 tokenizer: the same
    classes, processor and chat template as the real checkpoints, in seconds on a CPU."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    tokenizer = _tokenizer(preset, tokenizer_dir)
    ids = dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                   tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))))
    text = dict(hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
                num_attention_heads=TINY_HEADS, num_key_value_heads=2, vocab_size=len(tokenizer),
                max_position_embeddings=max(max_len, 2048), tie_word_embeddings=True)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=TINY_HIDDEN, patch_size=_patch(preset))
    if TINY[preset] == QWEN2_5_VL:
        config = Qwen2_5_VLConfig(vision_config={**vision, "window_size": 56, "fullatt_block_indexes": [1]},
                                  text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
                                  tie_word_embeddings=True, **ids)
    else:
        config = Qwen3VLConfig(vision_config={**vision, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
                               text_config={**text, "head_dim": TINY_HIDDEN // TINY_HEADS,
                                            "rope_scaling": {"rope_type": "default", "mrope_section": [4, 6, 6],
                                                             "mrope_interleaved": True}},
                               tie_word_embeddings=True, **ids)
    config._attn_implementation = attn
    return config
