"""VLFeedback-format rows made from the synthetic corpus, with a scripted judge.

Tests and the demo need preference data whose preference a tiny model can learn, and
whose pair rule outcomes are known. The synthetic world (`vlit.world`) gives
images with true answers; each prompt here gets up to four responses, rated the way a
careful judge would rate them:

    truth    the row's true answer                          5 5 5 (4 5 5 every 4th prompt)
    corrupt  the true answer reversed (words, or letters)   2 2 5; "N/A" faithfulness every 5th
    other    another row's (wrong) answer, same task         2 2 5
    other2   a second wrong answer                          2 2 5; 1 1 5 every 3rd prompt

The wrong responses mostly tie (no pair), so nearly every pair is the truth against a
wrong answer: a preference a tiny model can learn. The data still holds what the
released data does: ties, a non-numeric rating, and (every 3rd prompt) a pair of two
wrong answers ordered by their means. Ratings are strings, as in the release. `completions` < 4 keeps the first ones of that list; the
order inside a row is shuffled (seeded), so a pair's order comes from the ratings only.
"""
from __future__ import annotations

import json
import random

from vlit import storage
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.loops.feedback import RELEASE_ASPECTS

JUDGE = "synth-scripted-judge"
RATIONALES = {
    "truth": "The answer matches the image and follows the requested format.",
    "corrupt": "The answer garbles the content of the image.",
    "other": "The answer describes something that is not in the image.",
    "other2": "The answer describes something that is not in the image.",
}


def _reverse(answer: str) -> str:
    words = answer.split()
    flipped = " ".join(reversed(words)) if len(words) > 1 else answer[::-1]
    return flipped if flipped != answer else f"{answer} {answer}"


def _ratings(kind: str, i: int) -> tuple[str, str, str]:
    if kind == "truth":
        return ("4", "5", "5") if i % 4 == 0 else ("5", "5", "5")
    if kind == "corrupt":
        return ("2", "N/A", "5") if i % 5 == 0 else ("2", "2", "5")
    if kind == "other":
        return ("2", "2", "5")
    return ("1", "1", "5") if i % 3 == 0 else ("2", "2", "5")


def _wrong_answers(row: dict, rows: list[dict], rng: random.Random) -> list[str]:
    """Two answers of other rows that differ from this row's (same task first)."""
    truth = row["conversations"][1]["value"]
    same = sorted({r["conversations"][1]["value"] for r in rows if r["task_name"] == row["task_name"]} - {truth})
    rest = sorted({r["conversations"][1]["value"] for r in rows} - {truth} - set(same))
    rng.shuffle(same)
    rng.shuffle(rest)
    found = (same + rest)[:2]
    if len(found) < 2:
        raise ValueError(f"row {row['id']}: the corpus has fewer than two other answers to use as wrong responses")
    return found


def synth_feedback(annotation: str, prompts: int, completions: int = 4, seed: int = 0) -> dict:
    """Write `<annotation folder>/feedback-n{prompts}-k{completions}-seed{seed}.jsonl` from
    the first `prompts` image rows of a synthetic Vision-Flan `annotation.json` (read whole:
    meant for small corpora); image paths stay relative to that folder."""
    if not 2 <= completions <= 4:
        raise ValueError(f"completions must be 2, 3 or 4, got {completions}")
    rows = [r for r in storage.read_json(annotation) if r.get("image")]
    if len(rows) < prompts:
        raise ValueError(f"{annotation}: {len(rows)} rows with images, fewer than prompts={prompts}")
    out = storage.join(storage.parent(annotation), f"feedback-n{prompts}-k{completions}-seed{seed}.jsonl")
    lines = []
    for i, row in enumerate(rows[:prompts]):
        rng = random.Random(f"{seed}:{row['id']}")
        truth = row["conversations"][1]["value"]
        other, other2 = _wrong_answers(row, rows, rng)
        responses = list(zip(("truth", "corrupt", "other", "other2"), (truth, _reverse(truth), other, other2)))
        responses = responses[:completions]
        rng.shuffle(responses)
        items = [{"model": f"synth-{kind}", "response": text,
                  "annotations": {a: {"Rating": r, "Rationale": RATIONALES[kind]}
                                  for a, r in zip(RELEASE_ASPECTS, _ratings(kind, i))}}
                 for kind, text in responses]
        prompt = row["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
        lines.append(json.dumps({"id": row["id"], "prompt": prompt, "img_path": row["image"],
                                 "models": [c["model"] for c in items], "completions": items}))
    storage.write_bytes(out, ("\n".join(lines) + "\n").encode())
    return {"feedback": out, "prompts": prompts, "completions": completions, "judge": JUDGE}
