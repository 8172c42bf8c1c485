"""bench/sizing.py: the arithmetic of the README's sizing note, and its measurement path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sizing():
    spec = importlib.util.spec_from_file_location("sizing", REPO / "bench" / "sizing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_and_hours(sizing):
    assert sizing.gpu_hours(sizing.H100_BF16_PEAK * 0.4 * 3600, 0.4) == pytest.approx(1.0)
    # Text only: 6 FLOPs per LLM parameter per token.
    assert sizing.training_flops(10, 100, 0.0, 1e9, 4096) == pytest.approx(10 * 6 * 1e9 * 100)
    # An image adds the projector on 576 tokens (trained) and the vision tower on 577 (forward only).
    extra = sizing.training_flops(1, 0, 1.0, 1e9, 4096, epochs=2) / 2
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert extra == pytest.approx(6 * projector * 576 + 2 * sizing.VISION_PARAMS * 577)


def test_measure_on_the_sample(sizing, sample_dir, tokenizers_dir):
    """encode_row's lengths with the real LLaMA-2 tokenizer: every sample row accepted."""
    m = sizing.measure(sample_dir, str(tokenizers_dir / "llama2"))
    assert m["rows"] == 204 and m["image_tokens"] == 576 and m["quarantined"] == {} and m["vocab"] == 32002
    assert m["mean"] > 576 and m["max"] >= m["p90"] >= m["median"] and m["supervised_mean"] > 0
