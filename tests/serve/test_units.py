"""Serve pieces that need no cluster: the rubric parser, image checks, the reference judge,
the serve config, Ray Serve's config file, and the vllm backend's missing-package error."""
from __future__ import annotations

import base64
import json
import io
from pathlib import Path

import pytest
from PIL import Image

from vlit.config import (
    ConfigError,
    ImageLimitsConfig,
    OpenAIBackendConfig,
    ReferenceBackendConfig,
    ServeConfig,
    VLLMBackendConfig,
    load_config,
)
from vlit.serve import rubric
from vlit.serve.backends import JudgeItem, make_backend
from vlit.serve.backends.reference import reference_rating
from support import vllm_python
from vlit.config import ASPECTS
from vlit.serve.protocol import RequestError, load_image

REPO_CONFIGS = str(Path(__file__).resolve().parents[2] / "configs" / "serve")


def png_url(size=(16, 16), color="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("reply, expected", [
    ("Rating: 4\nRationale: Names the object correctly.", (4, "Names the object correctly.")),
    ("  Rating:5\nRationale:  Fully faithful.\nNothing invented.  ", (5, "Fully faithful.\nNothing invented.")),
    ("Rating: 1\r\nRationale: Wrong object.", (1, "Wrong object.")),
])
def test_parser_reads_the_documented_format(reply, expected):
    assert rubric.parse_reply(reply) == expected


@pytest.mark.parametrize("reply", [
    "",
    "4",
    "Rating: 6\nRationale: out of range",
    "Rating: 0\nRationale: out of range",
    "Rating: 4.5\nRationale: not a digit",
    "Rating: 4/5\nRationale: a fraction",
    "**Rating:** 4\nRationale: markdown",
    "Sure! Rating: 4\nRationale: text before",
    "Rating: 4",
    "Rating: 4\nRationale:",
    "Rationale: reversed\nRating: 4",
    "rating: 4\nrationale: lower case",
])
def test_parser_refuses_everything_else(reply):
    assert rubric.parse_reply(reply) is None


def test_rubric_prompts_name_the_aspect_and_the_format():
    for aspect in ASPECTS:
        text = rubric.prompt(aspect, "What is it?", "A cat.")
        assert rubric.RUBRICS[aspect] in text and rubric.REPLY_FORMAT in text
        assert "Instruction: What is it?" in text and "Response: A cat." in text
    assert rubric.expected_rating([0, 0, 0.5, 0.5, 0]) == pytest.approx(3.5)


def test_images_decode_and_limits_name_the_problem(tmp_path):
    limits = ImageLimitsConfig(max_bytes=2000, max_pixels=64 * 64, uri_roots=[str(tmp_path / "ok")])
    assert load_image(png_url(), limits).size == (16, 16)
    cases = [
        (png_url((65, 64)), 413, "pixels"),
        ("data:image/png;base64," + "A" * 4000, 413, "limit is 2000 bytes"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), 400, "not an image"),
        ("data:image/png;base64,%%%", 400, "not valid base64"),
        ("data:text/plain;base64,aGk=", 400, "image/* media type"),
        ("data:image/png,raw", 400, "must be base64"),
        ("https://example.com/cat.png", 400, "not fetched"),
        (str(tmp_path / "elsewhere.png"), 400, "outside the allowed roots"),
        (str(tmp_path / "ok" / "missing.png"), 400, "does not name a file"),
    ]
    for url, status, words in cases:
        with pytest.raises(RequestError) as err:
            load_image(url, limits)
        assert err.value.status == status and words in err.value.message, (url[:40], err.value.message)
    (tmp_path / "ok").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ok" / "a.png")
    assert load_image(str(tmp_path / "ok" / "a.png"), limits).size == (8, 8)
    # A root is a folder, not a string prefix: /x/ok-evil is not under /x/ok.
    (tmp_path / "ok-evil").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ok-evil" / "a.png")
    with pytest.raises(RequestError, match="outside the allowed roots"):
        load_image(str(tmp_path / "ok-evil" / "a.png"), limits)


def test_request_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(RequestError(413, "too big", param="image")))
    assert (e.status, e.message, e.param, e.code) == (413, "too big", "image", "too_large")
    assert e.body()["error"]["message"] == "too big"


def test_reference_judge_rates_against_the_answer_and_scripts_replies():
    assert reference_rating("There are three dogs.", "three")[0] == 5
    assert reference_rating("A cat.", "three dogs")[0] == 1
    assert 1 < reference_rating("three cats", "three dogs")[0] < 5
    backend = make_backend(ReferenceBackendConfig(kind="reference", replies=["Rating: 4\nRationale: Fine.", "It is a 4."]))
    with_ref = JudgeItem("How many dogs?", "three dogs", None, "three", list(ASPECTS), "generate", 64)
    scores = backend.judge([with_ref])[0]
    assert scores["visual_faithfulness"].status == "ok" and scores["visual_faithfulness"].rating == 5
    assert scores["visual_faithfulness"].rationale and scores["visual_faithfulness"].raw.startswith("Rating: 5")
    assert scores["ethical_considerations"].status == "unrated" and scores["ethical_considerations"].rating is None
    scripted = backend.judge([JudgeItem("How many dogs?", "two", None, None, list(ASPECTS), "generate", 64)])[0]
    assert scripted["helpfulness"].rating == 4.0
    assert scripted["visual_faithfulness"].status == "unparseable"
    assert scripted["visual_faithfulness"].rating is None and scripted["visual_faithfulness"].raw == "It is a 4."


def test_vllm_backend_without_vllm_says_so():
    cfg = VLLMBackendConfig(kind="vllm", model={"preset": None, "path": "/models/llava"})
    with pytest.raises(ImportError, match="needs the `vllm` package, which is not installed"):
        make_backend(cfg)


def test_openai_backend_needs_its_key_variable(monkeypatch):
    monkeypatch.delenv("VLIT_UNSET_KEY", raising=False)
    with pytest.raises(RuntimeError, match=r"\$VLIT_UNSET_KEY, which is not set"):
        make_backend(OpenAIBackendConfig(kind="openai", base_url="http://127.0.0.1:9/v1", model="m",
                                         api_key_env="VLIT_UNSET_KEY"))
    monkeypatch.setenv("VLIT_SET_KEY", "sk-secret-value-123")
    backend = make_backend(OpenAIBackendConfig(kind="openai", base_url="http://127.0.0.1:9/v1", model="m",
                                               api_key_env="VLIT_SET_KEY"))
    assert "sk-secret" not in repr(backend)


@pytest.mark.parametrize("overrides, path, words", [
    (["serve.generators.g.backend.kind=tpu"], "serve.generators.g.backend", "does not match any of the expected tags"),
    (["serve.generators.g.backend.kind=hf", "serve.generators.g.deployment.max_ongoing_requests=4"],
     "serve.generators.g.deployment", "must be at least batch.max_batch_size (16)"),
    (["serve.generators.g.backend.kind=openai", "serve.generators.g.backend.base_url=http://x/v1"],
     "serve.generators.g.backend.openai.model", "Field required"),
    (["serve.generators.g.backend.kind=hf", "serve.generators.g.backend.api_key=sk-1"],
     "serve.generators.g.backend.hf.api_key", "Extra inputs are not permitted"),
    (["serve.http.port=70000", "serve.judges.j.backend.kind=reference"], "serve.http.port", "less than or equal"),
    (["serve.app_name=vlit"], "serve", "at least one entry in generators or judges"),
    (["serve.judges.j.backend.kind=reference", "serve.judges.j.mode=vote"], "serve.judges.j.mode", "logprob"),
])
def test_serve_config_errors_name_the_key(overrides, path, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"{path}:" in str(err.value) and words in str(err.value), str(err.value)


def test_serve_only_config_needs_no_corpus_but_others_do():
    cfg = load_config(None, ["serve.judges.j.backend.kind=reference"])
    assert cfg.corpus is None and cfg.serve.judges["j"].mode == "logprob"
    with pytest.raises(ConfigError, match="corpus: Field required"):
        load_config(None, ["run.seed=1"])


BUILD_APP = """
import json, sys
import ray
from vlit.serve.app import app_builder
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[-1])
print("BUILT", type(app_builder(json.loads(sys.argv[1]))).__name__)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["tiny.yaml", "vlfeedback.yaml"])
def test_ray_serve_config_file_validates_and_builds(name):
    """`vlit config serve FILE` is Ray Serve's own schema, and its app builder builds the app."""
    from ray.serve.schema import ServeDeploySchema

    from vlit.serve.app import app_builder, deploy_config

    cfg = load_config(f"{REPO_CONFIGS}/{name}")
    deploy = deploy_config(cfg)
    schema = ServeDeploySchema.model_validate(deploy)
    app = schema.applications[0]
    assert app.import_path == "vlit.serve.app:app_builder"
    assert ServeConfig.model_validate(app.args) == cfg.serve
    if any(g.backend.kind == "vllm" for g in [*cfg.serve.generators.values(), *cfg.serve.judges.values()]):
        # Its engines are Ray Serve LLM deployments, whose builder imports vLLM.
        built = vllm_python.run_python(BUILD_APP, json.dumps(app.args)).split("BUILT ", 1)[1].strip()
    else:
        built = type(app_builder(app.args)).__name__
    assert built == "Application"
    with pytest.raises(ConfigError, match="serve.generators.x.backend"):
        app_builder({"generators": {"x": {"backend": {"kind": "nope"}}}})


def test_cli_prints_the_ray_serve_config(capsys):
    import yaml

    from vlit.cli import main

    assert main(["config", "serve", f"{REPO_CONFIGS}/tiny.yaml", "serve.http.port=8123"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["http_options"]["port"] == 8123 and printed["http_options"]["host"] == "127.0.0.1"


def test_hf_judge_prefix_cache_and_batching_change_no_score():
    """The rubric's keys and values are computed once and reused; the scores equal the
    whole prompt's, and a request's scores do not depend on its batch."""
    import dataclasses

    from vlit.config import HFBackendConfig
    from vlit.serve.backends import judge_prompt

    backend = make_backend(HFBackendConfig(kind="hf", model={"preset": "tiny", "max_len": 2048}, threads=1))
    items = [JudgeItem("Describe the image in detail, please." * (1 + i % 2), f"A square, {i}." * (1 + i % 3),
                       Image.new("RGB", (40, 30), ("red", "blue")[i % 2]) if i % 3 else None, None, list(ASPECTS),
                       "logprob", 32) for i in range(5)]
    prompts = [judge_prompt(it, a) for it in items for a in ASPECTS]
    cached = backend.rating_distributions(prompts)
    whole = backend.rating_distributions([dataclasses.replace(p, cache_prefix="") for p in prompts])
    alone = [backend.rating_distributions([p])[0] for p in prompts]
    assert len(backend._prefix_cache) == 3  # one per aspect
    for c, w, a in zip(cached, whole, alone):
        assert sum(c) == pytest.approx(1.0, abs=1e-6)
        assert c == pytest.approx(w, abs=1e-5) and c == pytest.approx(a, abs=1e-5)
