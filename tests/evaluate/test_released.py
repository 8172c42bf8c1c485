"""Released benchmarks read from small files in their own formats (images from the real
Vision-Flan sample): rows, rotations, versions, wrong layouts, an s3:// release, and one
evaluation end to end on the tiny model with its predictions re-scored from their table."""
import base64
import json
import shutil

import pytest

from vlit import storage
from vlit.config import BenchmarkConfig, ConfigError, load_config
from vlit.evaluate.gates import enforce_gates
from vlit.evaluate.harness import run_eval, score_predictions
from vlit.evaluate.released import benchmark_rows, build_benchmark_set

IMAGES = ("iconqa+choose_txt_208_image.png", "iconqa+fill_in_blank_729_image.png",
          "GTSRB+image_classification_48_00000_00001.jpeg", "Cars+car_classification_840_08025.jpg")


def _image(sample_dir, n: int) -> bytes:
    return (sample_dir / "task_imgs" / IMAGES[n]).read_bytes()


def write_mme(root, sample_dir):
    """existence in the images/ + questions_answers_YN/ layout, code_reasoning side by side."""
    for stem, n in (("a", 0), ("b", 1)):
        (root / "existence" / "images").mkdir(parents=True, exist_ok=True)
        (root / "existence" / "questions_answers_YN").mkdir(exist_ok=True)
        (root / "existence" / "images" / f"{stem}.png").write_bytes(_image(sample_dir, n))
        (root / "existence" / "questions_answers_YN" / f"{stem}.txt").write_text(
            f"Is there a shape in {stem}? Please answer yes or no.\tYes\n"
            f"Is there a dog in {stem}? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "c.jpeg").write_bytes(_image(sample_dir, 2))
    (root / "code_reasoning" / "c.txt").write_text("Does it print 3? Please answer yes or no.\tNo\n"
                                                   "Does it print 4? Please answer yes or no.\tYes\n")
    return BenchmarkConfig(path=str(root), subtasks=["existence", "code_reasoning"])


def write_pope(root, sample_dir):
    (root / "val2014").mkdir(parents=True)
    for n in (0, 3):
        (root / "val2014" / f"COCO_{n}.jpg").write_bytes(_image(sample_dir, n))
    for split, obj in (("random", "cat"), ("adversarial", "road")):
        lines = [{"question_id": 1, "image": "COCO_0.jpg", "text": "Is there a shape in the image?", "label": "yes"},
                 {"question_id": 2, "image": "COCO_3.jpg", "text": f"Is there a {obj} in the image?", "label": "no"}]
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(q) + "\n" for q in lines))
    return BenchmarkConfig(path=str(root), images=str(root / "val2014"), splits=["random", "adversarial"])


def write_mmbench(path, sample_dir, drop: str | None = None):
    """The single-pass TSV: question 7 with four options (and a hint), question 9 with two."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [["7", "What colour is the sign?", "Look at the top.", "red", "blue", "green", "white", "B",
             "attribute_recognition", "finegrained_perception", base64.b64encode(_image(sample_dir, 2)).decode()],
            ["9", "Is this a car?", "nan", "yes", "no", "nan", "nan", "A", "object_localization",
             "coarse_perception", base64.b64encode(_image(sample_dir, 3)).decode()]]
    keep = [i for i, h in enumerate(header) if h != drop]
    path.write_text("".join("\t".join(r[i] for i in keep) + "\n" for r in [header, *rows]))
    return BenchmarkConfig(path=str(path))


@pytest.fixture()
def release(tmp_path, sample_dir):
    return {"mme": write_mme(tmp_path / "MME", sample_dir), "pope": write_pope(tmp_path / "pope", sample_dir),
            "mmbench": write_mmbench(tmp_path / "mmbench.tsv", sample_dir)}


def test_rows_of_each_release_format(release, tmp_path):
    mme, mme_images = benchmark_rows("mme", release["mme"])
    assert mme.num_rows == 6 and len(mme_images) == 3
    assert sorted(set(mme.column("group").to_pylist())) == ["code_reasoning/c", "existence/a", "existence/b"]
    assert mme.column("answer").to_pylist()[:2] == ["yes", "no"]

    pope, pope_images = benchmark_rows("pope", release["pope"])
    assert pope.column("task").to_pylist() == ["random", "random", "adversarial", "adversarial"]
    assert len(pope_images) == 2  # one copy of an image however many splits ask about it
    assert pope.column("prompt").to_pylist()[0].endswith("Answer the question using a single word or phrase.")

    mmb, mmb_images = benchmark_rows("mmbench", release["mmbench"])
    rows = mmb.to_pylist()
    # Every rotation of the options, index + k * 1e6, the answer following its option.
    assert [r["key"] for r in rows] == ["mmbench/7", "mmbench/1000007", "mmbench/2000007", "mmbench/3000007",
                                        "mmbench/9", "mmbench/1000009"]
    assert [r["answer"] for r in rows] == ["B", "A", "D", "C", "A", "B"]
    assert rows[1]["options"] == ["blue", "green", "white", "red"] and rows[5]["options"] == ["no", "yes"]
    assert {r["group"] for r in rows} == {"7", "9"} and len(mmb_images) == 2
    assert rows[0]["prompt"].endswith("Look at the top.\nWhat colour is the sign?\nA. red\nB. blue\nC. green\n"
                                      "D. white\nAnswer with the option's letter from the given choices directly.")
    assert "nan" not in rows[4]["prompt"] and rows[4]["labels"] == ["A", "B"]

    # Unchanged files reuse the version; the digest covers the pixels.
    first = build_benchmark_set("mmbench", release["mmbench"], str(tmp_path / "evals"))
    assert build_benchmark_set("mmbench", release["mmbench"], str(tmp_path / "evals")).uri == first.uri
    assert first.rows == 6 and first.manifest["source"]["path"] == release["mmbench"].path


def test_released_dev_tsv_rotations_are_kept(tmp_path, sample_dir):
    # The legacy dev TSV holds its rotations itself; the later ones name the image by index.
    image = base64.b64encode(_image(sample_dir, 0)).decode()
    lines = ["index\tquestion\tA\tB\tanswer\tcategory\timage", f"4\tWhich?\tx\ty\tA\tocr\t{image}",
             "1000004\tWhich?\ty\tx\tB\tocr\t4"]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n")
    table, images = benchmark_rows("mmbench", BenchmarkConfig(path=str(tmp_path / "dev.tsv")))
    assert table.column("group").to_pylist() == ["4", "4"] and len(images) == 1


def test_wrong_layouts_name_the_path_and_what_is_missing(release, tmp_path, sample_dir):
    pope = release["pope"].model_copy(update={"splits": ["random", "popular"]})
    with pytest.raises(ConfigError, match=rf"{tmp_path}/pope/coco_pope_popular.json: the POPE popular split file is missing"):
        benchmark_rows("pope", pope)
    no_answer = write_mmbench(tmp_path / "no_answer.tsv", sample_dir, drop="answer")
    with pytest.raises(ConfigError, match=rf"{tmp_path}/no_answer.tsv: the MMBench TSV lacks the columns \['answer'\]"):
        benchmark_rows("mmbench", no_answer)
    with pytest.raises(ConfigError, match=r"MME subtask folders missing: \['count'\]"):
        benchmark_rows("mme", release["mme"].model_copy(update={"subtasks": ["existence", "count"]}))
    (tmp_path / "MME" / "existence" / "images" / "b.png").unlink()
    with pytest.raises(ConfigError, match=r"existence/questions_answers_YN/b.txt: no image named b"):
        benchmark_rows("mme", release["mme"])
    with pytest.raises(ConfigError, match="eval.benchmarks.pope.images"):
        benchmark_rows("pope", BenchmarkConfig(path=str(tmp_path / "pope")))


def test_a_release_on_s3_is_the_same_set(release, tmp_path, s3):
    local = build_benchmark_set("mme", release["mme"], str(tmp_path / "evals"))
    for path in sorted((tmp_path / "MME").rglob("*")):
        if path.is_file():
            storage.write_bytes(f"s3://vlit-test/bench/MME/{path.relative_to(tmp_path / 'MME')}", path.read_bytes())
    remote = build_benchmark_set("mme", release["mme"].model_copy(update={"path": "s3://vlit-test/bench/MME"}),
                                 "s3://vlit-test/evals")
    assert remote.digest == local.digest and remote.uri.startswith("s3://vlit-test/evals/mme-")


@pytest.mark.timeout(180)
def test_released_benchmarks_end_to_end_on_the_tiny_model(release, tmp_path, capsys):
    benchmarks = json.dumps({name: bench.model_dump() for name, bench in release.items()})
    cfg = load_config("configs/demo.yaml", [
        f"run.workdir={tmp_path}/work", f"eval.out={tmp_path}/evals", "eval.suites=[]", "eval.batch_size=8",
        f"eval.benchmarks={benchmarks}", "eval.gates={mme.perception: 0, pope.adversarial.f1: 0, mmbench.accuracy: 0}"])
    metrics = run_eval(cfg, None, stage="base")
    assert 0 <= metrics["mme.existence.acc_plus"] <= metrics["mme.existence.acc"] <= 1
    assert metrics["mme.perception"] == metrics["mme.existence.score"]
    assert metrics["mme.cognition"] == metrics["mme.code_reasoning.score"]
    assert {"pope.random.f1", "pope.adversarial.yes_ratio", "mmbench.attribute_recognition.accuracy",
            "mmbench.unmatched"} <= set(metrics)
    assert metrics["mmbench.unmatched"] == 0  # likelihood answers are option letters
    assert all(r.passed for r in enforce_gates(metrics, cfg.eval.gates, "base"))  # gates over the released names
    # The published prediction tables hold what was scored: re-scored without the model.
    tables = storage.list_files(str(tmp_path / "evals" / "predictions"), ("manifest.json",))
    assert len(tables) == 3
    rescored = {}
    for manifest in tables:
        rescored.update(score_predictions(storage.parent(manifest)))
    assert rescored == metrics
    from vlit.cli import main

    assert main(["eval", "score", *(storage.parent(m) for m in tables)]) == 0  # the same, from the command line
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)
    assert main(["eval", "score", str(tmp_path / "nothing")]) == 2
    shutil.rmtree(tmp_path / "MME")  # the set is versioned: evaluation no longer needs the release
    assert run_eval(cfg, None, {"mmbench": build_benchmark_set("mmbench", release["mmbench"], cfg.eval.out)}) == \
        {k: v for k, v in metrics.items() if k.startswith("mmbench.")}
