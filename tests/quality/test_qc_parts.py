"""Quality control's parts on inputs whose answer is known: the judge's reply parsers and
majority vote, the threshold filters, the CLIP-style dual encoder (built-in tiny and
loaded from a folder), the per-task diversity and the config's checks."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlit.config import QualityConfig
from vlit.quality.filters import apply_thresholds
from vlit.quality.judging import majority, parse_difficulty, parse_verdict

CORRECT, INCORRECT = "Verdict: correct\nReason: it is red.", "Verdict: incorrect\nReason: it is blue."


def test_verdict_and_difficulty_parse_exactly_or_not_at_all():
    assert parse_verdict(CORRECT) is True and parse_verdict(" Verdict: Incorrect\nReason: no ") is False
    for bad in ("correct", "Verdict: maybe\nReason: x", "Verdict: correct", "I think\nVerdict: correct\nReason: x", ""):
        assert parse_verdict(bad) is None, bad
    assert parse_difficulty("Difficulty: 10\nReason: many steps.") == 10
    assert parse_difficulty("Difficulty: 3\nReason: a glance.") == 3
    for bad in ("Difficulty: 0\nReason: x", "Difficulty: 11\nReason: x", "Difficulty: 7", "7", "Difficulty: 7.5\nReason: x"):
        assert parse_difficulty(bad) is None, bad


def test_majority_needs_more_than_half_of_all_votes():
    assert majority([True, False, True])["judge_correct"] == 1.0
    assert majority([False, False, True])["judge_correct"] == 0.0
    split = majority([True, None, False])  # one each and one unparseable: no majority
    assert split["judge_correct"] is None and "1 correct, 1 incorrect, 1 unparseable" in split["judge_error"]
    assert majority([True, None, None])["judge_correct"] is None  # 1 of 3 is not a majority
    assert majority([True, True, None])["judge_votes_valid"] == 2


def test_thresholds_keep_reject_and_tell_missing_from_not_applicable():
    rows = [{"id": "ok", "clip_score": 0.3, "difficulty": 4.0},
            {"id": "low", "clip_score": 0.05, "difficulty": 4.0},
            {"id": "hard", "clip_score": 0.3, "difficulty": 9.0},
            {"id": "text-only", "clip_score": None, "clip_error": None, "difficulty": 2.0},
            {"id": "unjudged", "clip_score": 0.3, "difficulty": None, "difficulty_error": "unparseable"}]
    kept, rejected = apply_thresholds(rows, {"clip_score": (0.1, None), "difficulty": (None, 8)})
    assert [r["id"] for r in kept] == ["ok", "text-only"]
    assert {r["id"]: (reason, detail) for r, reason, detail in rejected} == {
        "low": ("below_clip_score", "clip_score 0.05 < 0.1"),
        "hard": ("above_difficulty", "difficulty 9 > 8"),
        "unjudged": ("unscored_difficulty", "unparseable")}


def test_config_checks_metric_names_and_the_judge():
    with pytest.raises(ValueError, match="need quality.judge"):
        QualityConfig(thresholds={"judge_correct": (1, None)})
    with pytest.raises(ValueError, match="clip_score"):
        QualityConfig(thresholds={"clip": (0.1, None)})


def test_dual_encoder_from_a_folder_scores_as_built(tmp_path):
    from vlit.quality.clip import DualEncoder

    images = [Image.fromarray((np.random.RandomState(i).rand(48, 40, 3) * 255).astype("uint8")) for i in range(3)]
    texts = ["a red circle on the left", "two blue squares", "What is written at the top? SUN"]
    tiny = DualEncoder.load(None)
    scores = tiny.scores(images, texts)
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 3
    # A pair's score does not depend on the rest of its batch (padding is masked).
    assert tiny.scores(images[1:2], texts[1:2])[0] == pytest.approx(scores[1], abs=1e-5)
    tiny.save(str(tmp_path / "clip"))
    assert DualEncoder.load(str(tmp_path / "clip")).scores(images, texts) == pytest.approx(scores, abs=1e-6)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        tiny.scores(images, texts[:2])


def test_task_diversity_counts_communities_and_clusters():
    from vlit.quality.qc import task_diversity

    colour = ["What colour is the circle?", "Which colour does the circle have?"]
    stock = ["Quote the stock market price today", "Quote the market price of the stock"]
    rows = [{"task_name": "mixed", "instruction": i, "response": r}
            for i, r in zip(colour + stock, ["red apple fruit", "red apple fruit", "tax bank loan", "tax bank loan"])]
    rows += [{"task_name": "one", "instruction": "Count the dogs", "response": "three dogs"}]
    div = task_diversity(rows, QualityConfig(embedding="hashing", dbscan_eps=0.3, dbscan_min_samples=2))
    assert div["mixed"]["instruction_diversity"] == 2  # two disjoint word groups
    assert div["mixed"]["response_clusters"] == 2 and div["mixed"]["response_diversity"] == pytest.approx(np.log(2))
    assert div["one"] == {"rows": 1, "instruction_diversity": 1, "response_clusters": 0, "response_diversity": 0.0}


def test_bad_annotation_lines_are_quarantined_with_their_line(tmp_path):
    from vlit.loops.run import read_annotations

    path = tmp_path / "annotations.jsonl"
    path.write_text('{"id": "a", "image": "x.png", "captions": ["a red circle"]}\n'
                    'not json\n\n'
                    '{"id": "b"}\n'
                    '{"id": "c", "image": "y.png"}\n'
                    '{"id": "d", "image": "z.png"}\n')
    good, bad = read_annotations(str(path), limit=2)
    assert [a["id"] for a in good] == ["a", "c"]  # the limit counts good ones; d is not read
    assert [(q["reason"], q["source_ref"].rsplit("/", 1)[-1], q["raw"]) for q in bad] == [
        ("not_json", "annotations.jsonl:2", "not json"),
        ("not_annotation", "annotations.jsonl:4", '{"id": "b"}')]
    assert bad[1]["detail"] == "an annotation needs ['image']"
