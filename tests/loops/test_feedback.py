"""VLFeedback preference pairs: the pair rule on hand-made rows (2-4 completions, ties,
non-numeric ratings), `vlit feedback pairs` outputs, quarantine, digests and versions,
and the synthetic feedback the DPO tests train on."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlit import cli
from vlit.world import synth_corpus
from vlit.loops.feedback import RELEASE_ASPECTS as ASPECTS, build_pairs, pair_prompt, parse_rating, _response
from vlit.versions import PairsVersion
from vlit.loops.feedback_synth import JUDGE, synth_feedback


def completion(model: str, ratings, response: str | None = None) -> dict:
    """A released-format completion; `ratings` in ASPECTS order (strings, as released)."""
    return {"model": model, "response": response if response is not None else f"answer of {model}",
            "annotations": {a: {"Rating": r, "Rationale": f"{a} of {model}"} for a, r in zip(ASPECTS, ratings)}}


ROWS = [
    # 4 completions: means 5, 3, 3 (a tie), 3.667 ("4.0" parses as 4) -> 5 pairs, 1 tie.
    {"id": "p4", "prompt": "Describe the image.", "img_path": "img/a.png", "models": ["a", "b", "c", "d"],
     "completions": [completion("a", ["5", "5", "5"]), completion("b", ["3", "2", "4"]),
                     completion("c", ["3", "3", "3"]), completion("d", ["4.0", "2", "5"])]},
    # 3 completions, one with a non-numeric rating: only b-c can pair.
    {"id": "p3", "prompt": "What is shown?", "img_path": "img/a.png", "models": ["a", "b", "c"],
     "completions": [completion("a", ["5", "N/A", "5"]), completion("b", ["2", "2", "2"]),
                     completion("c", ["1", "1", "1"])]},
    # 2 completions with equal means: a tie, no pair.
    {"id": "p2", "prompt": "Count the shapes.", "img_path": "img/b.png", "models": ["a", "b"],
     "completions": [completion("a", ["4", "4", "4"]), completion("b", ["5", "3", "4"])]},
    # 2 completions, one missing an aspect: excluded, no pair.
    {"id": "p2m", "prompt": "Count again.", "img_path": None, "models": ["a", "b"],
     "completions": [completion("a", ["4", "4"]), completion("b", ["5", "5", "5"])]},
]


@pytest.fixture()
def released(tmp_path):
    """A JSONL in the released format with its images, plus lines that must be quarantined."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / name)
    bad = ["{not json", json.dumps({"id": "nocomp", "prompt": "x"}), json.dumps(ROWS[0]),  # duplicate id
           json.dumps({**ROWS[1], "id": "esc", "img_path": "../secret.png"}),
           json.dumps({**ROWS[1], "id": "gone", "img_path": "img/missing.png"})]
    path = tmp_path / "vlfeedback.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in ROWS] + bad) + "\n")
    return path


def test_ratings_parse_exactly_or_not_at_all():
    assert parse_rating("4") == parse_rating("4.0") == parse_rating(" 4 ") == 4
    assert parse_rating("3.5") == parse_rating(3.5)
    # What the release's own float() refuses is no rating: "4/5" is not 0.8.
    for bad in ("N/A", "", None, "four", "4 stars", True, "4/5", "7/2", "nan", "inf"):
        assert parse_rating(bad) is None


def test_pair_rule_orders_by_mean_and_skips_ties_and_unparseable():
    scores, pairs, ties, unparseable = pair_prompt([_response(c) for c in ROWS[0]["completions"]])
    assert [float(s) for s in scores] == pytest.approx([5, 3, 3, 11 / 3])
    # Every two parseable responses, the higher mean first; (1, 2) tie.
    assert pairs == [(0, 1), (0, 2), (0, 3), (3, 1), (3, 2)] and ties == [(1, 2)] and unparseable == []
    _, pairs, ties, unparseable = pair_prompt([_response(c) for c in ROWS[1]["completions"]])
    assert pairs == [(1, 2)] and ties == [] and unparseable == [0]
    _, pairs, ties, unparseable = pair_prompt([_response(c) for c in ROWS[2]["completions"]])
    assert pairs == [] and ties == [(0, 1)] and unparseable == []
    _, pairs, ties, unparseable = pair_prompt([_response(c) for c in ROWS[3]["completions"]])
    assert pairs == [] and ties == [] and unparseable == [0]


def test_cli_writes_pairs_summary_excluded_and_quarantine(released, tmp_path, capsys):
    assert cli.main(["feedback", "pairs", str(released), "--out", str(tmp_path / "pairs"), "--judge", "judge-7"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "pairs" / summary["digest"]  # content-addressed, like every version
    assert json.loads((out / "summary.json").read_text())["digest"] == summary["digest"]
    assert {k: summary[k] for k in ("prompts", "pairs", "ties", "unparseable", "quarantined")} == \
        {"prompts": 4, "pairs": 6, "ties": 2, "unparseable": 2, "quarantined": 5}
    assert summary["completions_per_prompt"] == {"2": 2, "3": 1, "4": 1}

    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    first = pairs[0]
    assert first["pair_id"] == "p4:0>1" and first["chosen_model"] == "a" and first["rejected_model"] == "b"
    assert first["chosen_ratings"] == [5, 5, 5] and first["rejected_score"] == pytest.approx(3.0)
    assert first["rejected_rationales"] == [f"{a} of b" for a in ASPECTS] and first["judge"] == "judge-7"
    assert first["image"] == str(tmp_path / "img" / "a.png") and first["source"] == str(released)
    assert (first["chosen"], first["rejected"]) == ("answer of a", "answer of b")
    assert [p["pair_id"] for p in pairs] == ["p4:0>1", "p4:0>2", "p4:0>3", "p4:3>1", "p4:3>2", "p3:1>2"]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)

    excluded = pq.read_table(out / "excluded.parquet").to_pylist()
    assert sorted((e["reason"], e["prompt_id"], e["index"]) for e in excluded) == [
        ("tie", "p2", 0), ("tie", "p4", 1), ("unparseable_rating", "p2m", 0), ("unparseable_rating", "p3", 0)]
    na = next(e for e in excluded if e["prompt_id"] == "p3")
    assert "Visual Faithfulness: 'N/A'" in na["detail"] and na["ratings"] == ["5", "N/A", "5"]
    assert next(e for e in excluded if e["prompt_id"] == "p4")["other_index"] == 2

    quarantine = {r["source_ref"].rsplit("#", 1)[1]: r for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert {k: v["reason"] for k, v in quarantine.items()} == {
        "4": "unparseable", "5": "missing_fields", "6": "duplicate_key", "7": "image_path_escapes_root",
        "8": "image_missing"}
    assert "missing completions" in quarantine["5"]["detail"] and "'p4'" in quarantine["6"]["detail"]
    assert PairsVersion.open(str(out)).rows == 6


def test_digest_names_the_pairs(released, tmp_path):
    a = build_pairs([str(released)], str(tmp_path / "a"))
    assert build_pairs([str(released)], str(tmp_path / "b"))["digest"] == a["digest"]
    # Any change to what a pair says changes the digest: here one rating of a chosen response.
    lines = released.read_text().splitlines()
    lines[0] = lines[0].replace('"Rating": "5"', '"Rating": "4"', 1)
    released.write_text("\n".join(lines) + "\n")
    assert build_pairs([str(released)], str(tmp_path / "c"))["digest"] != a["digest"]


def test_a_judge_of_fewer_aspects_pairs_by_the_mean_of_those_it_rated(tmp_path):
    """Ethics unrated (absent): pairs by helpfulness and faithfulness, ethics null in the
    ratings; a response missing a rated aspect still makes no pair; all tied: no pair."""
    rated = ASPECTS[:2]
    row = {"id": "q", "prompt": "Count.", "img_path": None, "models": ["a", "b", "c"],
           "completions": [completion("a", ["5", "4"]), completion("b", ["3", "3"]), completion("c", ["5"])]}
    scores, pairs, ties, unparseable = pair_prompt([_response(c) for c in row["completions"]], rated)
    assert scores[:2] == [4.5, 3] and pairs == [(0, 1)] and ties == [] and unparseable == [2]
    assert pair_prompt([_response(c) for c in row["completions"]])[3] == [0, 1, 2]  # all three aspects asked
    path = tmp_path / "two.jsonl"
    tied = {**row, "id": "t", "completions": [completion("a", ["4", "4"]), completion("b", ["5", "3"])]}
    path.write_text(json.dumps(row) + "\n" + json.dumps(tied) + "\n")
    summary = build_pairs([str(path)], str(tmp_path / "pairs"), aspects=rated, provenance={"responses": "R"})
    assert (summary["pairs"], summary["ties"], summary["unparseable"]) == (1, 1, 1)
    (pair,) = pq.read_table(f"{summary['version']}/pairs.parquet").to_pylist()
    assert pair["chosen_ratings"] == [5.0, 4.0, None] and pair["chosen_score"] == 4.5
    manifest = PairsVersion.open(summary["version"]).manifest
    assert manifest["aspects"] == list(rated) and manifest["responses"] == "R"
    with pytest.raises(ValueError, match="each must be one of"):
        build_pairs([str(path)], str(tmp_path / "pairs"), aspects=("Honesty",))


def test_pairs_versions_are_content_addressed_and_reused(released, tmp_path):
    first = build_pairs([str(released)], str(tmp_path / "versions"))
    again = build_pairs([str(released)], str(tmp_path / "versions"))
    assert first["version"] == again["version"] == str(tmp_path / "versions" / first["digest"])
    assert not first["reused"] and again["reused"]
    assert not (tmp_path / "versions" / "_staging").exists() or not any((tmp_path / "versions" / "_staging").iterdir())
    with pytest.raises(FileNotFoundError, match="not a finished pairs version"):
        PairsVersion.open(str(tmp_path))


def test_synthetic_feedback_prefers_the_true_answer(tmp_path):
    synth = synth_corpus(str(tmp_path / "src"), instances=60, tasks=3, image_pool=6, image_size=32)
    made = synth_feedback(synth["annotation"], prompts=15)
    rows = [json.loads(line) for line in open(made["feedback"])]
    assert len(rows) == 15 and all(len(r["completions"]) == 4 and r["img_path"].startswith("./images/") for r in rows)
    summary = build_pairs([made["feedback"]], str(tmp_path / "pairs"), judge=JUDGE)
    assert summary["ties"] > 0 and summary["unparseable"] == 3 and summary["quarantined"] == 0
    pairs = pq.read_table(f"{summary['version']}/pairs.parquet").to_pylist()
    truth = [p for p in pairs if p["chosen_model"] == "synth-truth"]
    # Truth beats the 3 wrong answers (2 where the corrupted one is unrated). Every 3rd
    # prompt rates its second wrong answer lower than the other two: 2 more pairs (1 at
    # prompt 0, whose corrupted answer is unrated).
    assert len(truth) == 15 * 3 - 3 and len(pairs) == len(truth) + 2 * 5 - 1
    assert not any(p["rejected_model"] == "synth-truth" for p in pairs)
    truths = {r["id"]: next(c["response"] for c in r["completions"] if c["model"] == "synth-truth") for r in rows}
    assert all(p["chosen"] == truths[p["prompt_id"]] != p["rejected"] for p in truth)


def test_responses_where_every_pair_ties_stop_the_dpo_stage_with_why(tmp_path):
    """A responses version (as the align stage writes it) whose responses all tie: its pairs
    version is built and kept, and the stage stops naming the counts and the exclusions."""
    from vlit.config import FeedbackLoopConfig, load_config
    from vlit.loops.feedback_loop import write_responses
    from vlit.pipeline import pairs_stage
    from vlit.train.loop import NoTrainingData

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    loop = FeedbackLoopConfig(generators=["tiny", "oracle"], judge="reference",
                              aspects=["helpfulness", "visual_faithfulness"])
    rows = [{"id": f"p{i}", "prompt": "Count.", "img_path": str(tmp_path / "a.png"), "task": "t",
             "models": ["tiny", "oracle"],
             "completions": [completion("tiny", ["4", "2"]), completion("oracle", ["3", "3"])]} for i in range(3)]
    responses = write_responses(rows, str(tmp_path / "responses"), loop, corpus=str(tmp_path / "corpus"))
    assert responses.manifest["sources"] == [str(tmp_path / "corpus")]
    cfg = load_config("configs/demo.yaml", [f"dpo.pairs_out={tmp_path / 'pairs'}"])
    with pytest.raises(NoTrainingData, match=r"has no pair: 3 prompts, 3 ties, 0 responses .*excluded\.parquet"):
        pairs_stage(cfg, responses.uri)
    # The same tie, with ethics rated too and lower for tiny's: one pair per prompt.
    for row in rows:
        row["completions"] = [completion("tiny", ["4", "2", "1"]), completion("oracle", ["3", "3", "3"])]
    again = write_responses(rows, str(tmp_path / "responses"), FeedbackLoopConfig(generators=["tiny", "oracle"], judge="reference"))
    assert pairs_stage(cfg, again.uri).rows == 3
