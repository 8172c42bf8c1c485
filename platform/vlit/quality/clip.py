"""Image-text matching with a CLIP-style dual encoder: the correctness signal of the
review's quality control (section 4.2.3) that needs no judge.

`DualEncoder.load(None)` builds the tiny one from config (a CLIP text and vision tower,
the tiny LLaVA's sizes, over the offline tokenizer): untrained, so its scores carry no meaning, but
every code path a real CLIP takes runs on CPU in seconds. `DualEncoder.load(PATH)` loads
a real CLIP (e.g. openai/clip-vit-large-patch14-336) in Hugging Face format from a
folder or an s3:// URI. The score of an (image, text) pair is the cosine similarity of
their projected embeddings, in [-1, 1] (CLIPScore without its rescaling).
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

from vlit.model.build import TINY_HEADS, TINY_HIDDEN, TINY_IMAGE_SIZE, TINY_LAYERS, TINY_PATCH_SIZE, local_copy
from vlit.model.tokenizer import build_tiny_tokenizer

MAX_TEXT_TOKENS = 77  # CLIP's text context


class DualEncoder:
    def __init__(self, model: CLIPModel, tokenizer, image_processor):
        self.model = model.eval()
        self.tokenizer, self.image_processor = tokenizer, image_processor

    @classmethod
    def load(cls, path: str | None) -> "DualEncoder":
        if path is None:
            return cls.tiny()
        folder = local_copy(path)
        return cls(CLIPModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                   AutoImageProcessor.from_pretrained(folder))

    @classmethod
    def tiny(cls) -> "DualEncoder":
        tokenizer = build_tiny_tokenizer()
        layers = dict(hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
                      num_attention_heads=TINY_HEADS)
        config = CLIPConfig(
            text_config=dict(**layers, vocab_size=len(tokenizer), max_position_embeddings=MAX_TEXT_TOKENS,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id),
            vision_config=dict(**layers, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE),
            projection_dim=TINY_HIDDEN)
        torch.manual_seed(0)  # the same tiny weights in every process: the same scores
        processor = CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                                          crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        return cls(CLIPModel(config), tokenizer, processor)

    def save(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)

    def _text_inputs(self, texts: list[str]) -> dict:
        eos = self.tokenizer.eos_token_id
        ids = []
        for text in texts:
            seq = self.tokenizer(text, truncation=True, max_length=MAX_TEXT_TOKENS)["input_ids"]
            # CLIP pools the text at its end-of-text token: a tokenizer that does not add
            # one (the tiny BPE) gets it here, after truncation, so it is always there.
            if not seq or seq[-1] != eos:
                seq = seq[: MAX_TEXT_TOKENS - 1] + [eos]
            ids.append(seq)
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
                "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])}

    @torch.inference_mode()
    def scores(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        """Cosine similarity of each (image, text) pair."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not texts:
            return []
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels, **self._text_inputs(texts))
        # CLIPModel returns both embeddings L2-normalized.
        return (out.image_embeds * out.text_embeds).sum(-1).tolist()
