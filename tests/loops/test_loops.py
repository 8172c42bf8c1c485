"""The synthetic loops end to end through one real Serve application on loopback: the
VLFeedback loop (tiny LLaVA + a scripted generator, tiny judge), VIGC (scripted VIG
replies, a scripted corrector), self-instruct and the alignment set; each writes a
versioned dataset. Serve starts once for the module."""
from __future__ import annotations

import json

import pytest
from support.s3 import free_port

pytestmark = pytest.mark.timeout(420)

QA = "Question: What shapes are in the image?\nAnswer: There are two shapes."
MALFORMED = "The image shows some shapes."
CORRECTED = "There is a red circle. It is on the left. Nothing else is there."
DIALOGUE = json.dumps([{"User": "What color is the circle?", "AI": "The circle is red."},
                       {"User": "Is there a dog?", "AI": "No, there is no dog in the image."}])
SAYS = json.dumps([{"User": "What is shown?", "AI": "The description says there is a circle."}])
# The QC judge: its verdict prompts get these 3 replies (2 of 3 say correct), its
# difficulty prompts a 7.
VOTES = ["Verdict: correct\nReason: right.", "Verdict: incorrect\nReason: wrong.", "Verdict: correct\nReason: right."]
DIFFICULTY = "Difficulty: 7\nReason: it needs counting."


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    from ray import serve

    from vlit.config import PrepareConfig, ServeConfig
    from vlit.corpus.prepare import prepare_corpus
    from vlit.world import synth_corpus
    from vlit.serve.app import start

    base = tmp_path_factory.mktemp("loops")
    synth = synth_corpus(str(base / "src"), instances=40, tasks=4, image_pool=8, image_size=32)
    corpus = prepare_corpus(PrepareConfig(sources=[synth["annotation"]]), str(base / "versions"))["version"]
    tiny = {"kind": "hf", "model": {"preset": "tiny", "max_len": 2048}, "threads": 1}
    small = {"num_cpus": 0.1, "max_ongoing_requests": 64, "batch": {"max_batch_size": 16}}
    cfg = ServeConfig.model_validate({
        "app_name": "loops",
        "http": {"host": "127.0.0.1", "port": free_port()},
        "images": {"uri_roots": [str(base)]},
        "generators": {
            "tiny": {"backend": tiny, "max_new_tokens": 16,
                     "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 64, "batch": {"max_batch_size": 16}}},
            "vig": {"backend": {"kind": "reference", "replies": [QA, MALFORMED]}, "deployment": small},
            "vic": {"backend": {"kind": "reference", "replies": [CORRECTED]}, "deployment": small},
            "si": {"backend": {"kind": "reference", "replies": [DIALOGUE, MALFORMED, SAYS]}, "deployment": small},
            "qcj": {"backend": {"kind": "reference", "scripts": {"Verdict:": VOTES, "Difficulty:": [DIFFICULTY]}},
                    "deployment": small},
        },
        "judges": {"tiny": {"backend": tiny, "mode": "logprob",
                            "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 64,
                                           "batch": {"max_batch_size": 32}}}},
    })
    start(cfg)
    yield {"corpus": corpus, "base": base, "synth": synth, "app": "loops", "serve": cfg}
    serve.delete("loops")


def test_feedback_loop_makes_a_pairs_version(world):
    from vlit.config import FeedbackLoopConfig
    from vlit.versions import PairsVersion
    from vlit.loops.feedback_loop import feedback_pairs

    cfg = FeedbackLoopConfig(prompts=3, responses=4, generators=["tiny", "vig"], max_tokens=8)
    out = world["base"] / "feedback"
    summary = feedback_pairs(cfg, world["corpus"], str(out), app_name=world["app"])
    assert summary["prompts"] == 3 and summary["responses"] == 12 and not summary["generation_errors"]
    rows = [json.loads(line) for line in open(summary["responses_file"])]
    assert [len(r["completions"]) for r in rows] == [4, 4, 4]
    assert {c["model"] for r in rows for c in r["completions"]} == {"tiny", "vig"}
    # Every aspect rated by the tiny judge (logprob: a number per aspect).
    assert all(float(a["Rating"]) for r in rows for c in r["completions"] for a in c["annotations"].values())
    # Every two of a prompt's 4 rated responses pair up or tie (6 = 4 choose 2).
    assert summary["pairs"] + summary["ties"] == 3 * 6 and summary["unparseable"] == 0
    version = PairsVersion.open(summary["version"])
    pairs = version.read_table().to_pylist()
    assert len(pairs) == summary["pairs"] and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["image"].startswith(str(world["base"])) for p in pairs)
    again = feedback_pairs(cfg, world["corpus"], str(out), app_name=world["app"])
    assert again["version"] == summary["version"] or again["digest"] != summary["digest"]


def test_vigc_generates_corrects_and_quarantines(world):
    from vlit.config import VIGCConfig
    from vlit.versions import DatasetVersion
    from vlit.loops.vigc import vigc_dataset

    cfg = VIGCConfig(images=2, types=["conversation", "complex_reasoning"], generator="vig", corrector="vic",
                     samples=2, rounds=6)
    summary = vigc_dataset(cfg, world["corpus"], str(world["base"] / "vigc"), app_name=world["app"])
    version = DatasetVersion.open(summary["version"])
    rows = version.read_rows()
    assert len(rows) == 4 and summary["quarantined"] == 4
    assert summary["quarantine_reasons"] == {"not_question_answer": 4}
    for r in rows:
        assert r["question"] == "What shapes are in the image?" and r["vig_answer"] == "There are two shapes."
        assert r["vic_answer"] == CORRECTED and r["vic_rounds"] == 4 and r["vic_stop"] == "end"
        assert r["vig_model"] == "vig" and r["vic_model"] == "vic" and r["image"]
    quarantine = version.read_table("quarantine.parquet").to_pylist()
    assert all(q["raw"] == MALFORMED for q in quarantine)


def test_self_instruct_parses_dialogues_and_quarantines_the_rest(world):
    from vlit.config import SelfInstructConfig
    from vlit.versions import DatasetVersion
    from vlit.loops.self_instruct import self_instruct, synth_annotations

    anns = synth_annotations(world["synth"]["out"] if "out" in world["synth"] else str(world["base"] / "src"), 0, 2)
    cfg = SelfInstructConfig(images=2, generator="si", samples=3)
    summary = self_instruct(anns, cfg, str(world["base"] / "self-instruct"), app_name=world["app"])
    rows = DatasetVersion.open(summary["version"]).read_rows()
    assert len(rows) == 2 and summary["quarantine_reasons"] == {"mentions_description": 2, "not_json": 2}
    assert rows[0]["conversations"][0]["value"].startswith("<image>\nWhat color")
    assert rows[0]["task_name"] == "self_instruct" and rows[0]["image"].endswith(".png")
    world["si_version"] = summary["version"]


def test_alignment_set_is_judged_balanced_and_in_release_format(world):
    from vlit import storage
    from vlit.config import AlignmentConfig, VIGCConfig
    from vlit.loops.alignment import build_alignment_set
    from vlit.loops.vigc import vigc_dataset

    vigc = vigc_dataset(VIGCConfig(images=2, types=["conversation", "complex_reasoning"], generator="vig",
                                   corrector="vic", samples=1, rounds=4),
                        world["corpus"], str(world["base"] / "vigc2"), app_name=world["app"])
    summary = build_alignment_set(AlignmentConfig(size=5), [vigc["version"], world["si_version"]],
                                  str(world["base"] / "alignment"), app_name=world["app"])
    assert summary["candidates"] == 6 and summary["rows"] == 5
    # Three tasks with 2 candidates each: round robin gives 2, 2, 1.
    assert sorted(summary["tasks"].values()) == [1, 2, 2]
    release = storage.read_json(storage.join(summary["version"], "annotation.json"))
    assert len(release) == 5 and all(set(r) == {"id", "image", "task_name", "conversations"} for r in release)


def qc_source(world) -> str:
    """A generated version whose QC outcome is known: task `count` has 3 rows with long
    instructions (1 too long for the threshold), `colour` one row, plus a text-only row and
    a row whose image is not an image."""
    from vlit.versions import publish_rows

    images = sorted((world["base"] / "src" / "images").glob("*.png"))
    broken = world["base"] / "broken.png"
    broken.write_bytes(b"not a png at all")

    def row(i, task, instruction, image):
        return {"id": f"r{i}", "image": str(image) if image else None, "task_name": task,
                "conversations": [{"from": "human", "value": f"<image>\n{instruction}" if image else instruction},
                                  {"from": "gpt", "value": f"answer {i}"}]}

    rows = [row(0, "count", "How many shapes are there?", images[0]),
            row(1, "count", "How many circles are in the picture, counting the small ones too?", images[1]),
            row(2, "count", "How many red shapes are there?", images[2]),
            row(3, "colour", "What colour is the circle?", images[3]),
            row(4, "colour", "Name a colour.", None),
            row(5, "colour", "What colour is the square?", broken)]
    return publish_rows(str(world["base"] / "qc-src"), "hand-made", rows, [], {})["version"]


def test_quality_control_scores_filters_resamples_and_reports(world):
    from vlit.config import QualityConfig
    from vlit.quality.qc import run_qc
    from vlit.versions import DatasetVersion

    cfg = QualityConfig(embedding="hashing", judge="qcj", votes=3, per_task=1, seed=0,
                        thresholds={"instruction_words": (None, 8), "judge_correct": (1, None), "difficulty": (None, 8)})
    summary = run_qc(cfg, qc_source(world), str(world["base"] / "qc"), app_name=world["app"])
    assert summary["source_rows"] == 6
    # r5: not an image; r1: 13 words > 8; count keeps 1 of its 2 others, colour 1 of 2.
    assert summary["rejected"] == {"above_instruction_words": 1, "balance_resampled": 2, "image_unreadable": 1}
    version = DatasetVersion.open(summary["version"])
    rows = {r["id"]: r for r in version.read_rows()}
    assert summary["rows"] == 2 and summary["tasks"] == {"colour": 1, "count": 1}
    for r in rows.values():
        assert r["judge_correct"] == 1.0 and r["judge_votes_correct"] == 2 and r["judge_votes_valid"] == 3
        assert r["difficulty"] == 7.0 and r["instruction_questions"] == (r["id"] != "r4")
        assert (r["clip_score"] is None) == (r["image"] is None)
    quarantine = {q["source_ref"]: q for q in version.read_table("quarantine.parquet").to_pylist()}
    assert quarantine["r5"]["reason"] == "image_unreadable" and quarantine["r1"]["detail"] == "instruction_words 12 > 8"
    report = json.loads((world["base"] / "qc" / version.digest / "quality" / "report.json").read_text())
    assert report["source_rows"] == 6 and report["rows"] == 2 and report["judge_votes"] == 15
    assert report["scores"]["difficulty"]["mean"] == 7.0 and set(report["diversity"]) == {"colour", "count"}
    assert (world["base"] / "qc" / version.digest / "quality" / "scores.png").stat().st_size > 1000
    annotation = json.loads((world["base"] / "qc" / version.digest / "annotation.json").read_text())
    assert [a["id"] for a in annotation] == sorted(rows) and all(not (a["image"] or "x").startswith("/") for a in annotation)


def test_loops_cli_runs_a_loop_against_the_running_app(world, tmp_path, capsys):
    """`vlit loops vigc CONFIG --corpus V --attach`: the config's serve section names the
    running app; the version goes under loops.out/vigc/."""
    import yaml

    from vlit.cli import main

    config = tmp_path / "loops.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"workdir": str(tmp_path / "work")}, "serve": world["serve"].model_dump(mode="json"),
        "loops": {"out": str(tmp_path / "synth"),
                  "vigc": {"images": 1, "types": ["conversation"], "generator": "vig", "corrector": "vic",
                           "rounds": 4}}}))
    # An override after the options is taken too.
    assert main(["loops", "vigc", str(config), "--corpus", world["corpus"], "--attach", "loops.vigc.samples=2"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{") + 1 if not out.startswith("{") else 0:])  # after Ray's own lines
    assert summary["rows"] == 1 and summary["quarantined"] == 1 and summary["version"].startswith(str(tmp_path / "synth" / "vigc"))
    assert main(["loops", "self-instruct", str(config), "--attach"]) == 2
    assert "give --annotations or --synth-corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # anything else unknown is still an error
        main(["loops", "vigc", str(config), "--corpus", world["corpus"], "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
