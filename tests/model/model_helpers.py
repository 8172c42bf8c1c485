"""Helpers the model tests share: canonical rows and the real Vision-Flan sample as a version."""
from __future__ import annotations

from vlit.config import PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.world import synth_corpus
from vlit.versions import CorpusVersion


def row(*contents: str, task: str = "t", image: bool = True) -> dict:
    """A canonical row from alternating user/assistant contents."""
    roles = ["user", "assistant"] * len(contents)
    return {
        "turns": [{"role": r, "content": c} for r, c in zip(roles, contents)],
        "task": task,
        "image": "s3://x/img.png" if image else None,
        "key": f"k{abs(hash(contents)) % 10**8}",
    }


def sample_version(sample_dir, out) -> CorpusVersion:
    summary = prepare_corpus(PrepareConfig(sources=[str(sample_dir / "annotation.json")], format="vision-flan"), str(out))
    return CorpusVersion.open(summary["version"])


def synth_version(out: str, instances: int, tasks: int) -> CorpusVersion:
    synth = synth_corpus(f"{out}/src", instances=instances, tasks=tasks, image_pool=8, image_size=32)
    summary = prepare_corpus(PrepareConfig(sources=[synth["annotation"]]), f"{out}/versions")
    return CorpusVersion.open(summary["version"])
