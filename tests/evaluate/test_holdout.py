"""eval.holdout: a deterministic fraction of a prepared corpus's rows, out of the training
stream and scored per task (the synthetic corpus and the real Vision-Flan sample)."""
import pytest

from corpus.stream_helpers import synth_version  # tests/ is on the path (conftest)
from vlit.config import ConfigError, CorpusConfig, HoldoutConfig, PrepareConfig, load_config
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.sampling import held_out
from vlit.corpus.stream import build_stream
from vlit.evaluate.harness import build_eval_sets, run_eval
from vlit.evaluate.holdout import holdout_rows, holdout_scores
from vlit.loops.dataset import corpus_prompts
from vlit.versions import CorpusVersion

HOLDOUT = HoldoutConfig(fraction=0.3, seed=5)


@pytest.mark.timeout(120)
def test_held_out_rows_never_reach_the_training_stream(ray_local, tmp_path):
    version, _ = synth_version(str(tmp_path))
    keys = version.read_table(columns=["key"])["key"]
    out = {k for k, h in zip(keys.to_pylist(), held_out(keys, HOLDOUT.fraction, HOLDOUT.seed)) if h}
    assert 0 < len(out) < len(keys)
    cfg = CorpusConfig(out=version.uri, stream={"image_size": 16, "batch_size": 16})
    streamed = [k for b in build_stream(version, cfg, holdout=HOLDOUT).iter_batches(batch_size=32, batch_format="numpy")
                for k in b["key"].tolist()]
    # Every other row once (rate 1 with no cap), not one held-out row.
    assert sorted(streamed) == sorted(set(keys.to_pylist()) - out)
    table, _, unscored = holdout_rows(version, HOLDOUT)
    assert {k.removeprefix("holdout/") for k in table.column("key").to_pylist()} == out and unscored == {}
    # Nor do the loops draw them as prompts (the alignment set that stage 2 trains on).
    drawn = {p.id for p in corpus_prompts(version.uri, len(keys), holdout=HOLDOUT)}
    assert drawn == set(keys.to_pylist()) - out


def test_choices_from_options_or_the_tasks_answers(tmp_path, sample_dir):
    # Real Vision-Flan rows: a multiple-choice row gets its options as the reply writes them,
    # "(a) ..."; a free-text task with one distinct reply has nothing to choose among.
    summary = prepare_corpus(PrepareConfig(sources=[f"{sample_dir}/metadata.json"], format="vision-flan-raw"),
                             str(tmp_path / "vf"))
    table, images, unscored = holdout_rows(CorpusVersion.open(summary["version"]), HoldoutConfig(fraction=0.5))
    rows = table.to_pylist()
    assert rows and all(r["answer"] in r["labels"] and r["labels"][0].startswith("(a) ") for r in rows)
    assert unscored["no_choices"] > 0 and len(images) == len(rows)
    # Synthetic rows: classification tasks choose among the task's distinct replies.
    table, _, _ = holdout_rows(synth_version(str(tmp_path / "synth"))[0], HOLDOUT)
    counting = next(r for r in table.to_pylist() if r["task"].startswith("synth-count+object_counting"))
    assert counting["labels"] == ["1", "2", "3", "4"] and counting["answer"] in counting["labels"]


def test_exact_match_after_normalization_per_task():
    rows = [{"key": str(i), "task": t, "group": str(i), "answer": a, "prediction": p}
            for i, (t, a, p) in enumerate([("color", "Red", "red."), ("color", "blue", "Blue sky"),
                                           ("count", "2", " 2 "), ("count", "3", "3")])]
    assert holdout_scores(rows) == {"color.accuracy": 0.5, "count.accuracy": 1.0, "accuracy": 0.75}


@pytest.mark.timeout(120)
def test_holdout_evaluated_end_to_end_on_the_tiny_model(tmp_path):
    version, _ = synth_version(str(tmp_path))
    cfg = load_config("configs/demo.yaml", [f"run.workdir={tmp_path}/work", f"eval.out={tmp_path}/evals",
                                            "eval.suites=[]", "eval.holdout={fraction: 0.3, seed: 5}",
                                            "eval.gates={holdout.accuracy: 0}", "eval.batch_size=8"])
    with pytest.raises(ConfigError, match="eval.holdout needs a prepared corpus"):
        build_eval_sets(cfg)
    sets = build_eval_sets(cfg, version.uri)
    assert sets["holdout"].manifest["corpus_digest"] == version.digest
    metrics = run_eval(cfg, None, sets)
    tasks = {t.rsplit(".", 1)[0] for t in metrics if t != "holdout.accuracy"}
    assert 0 <= metrics["holdout.accuracy"] <= 1 and len(tasks) == 6
