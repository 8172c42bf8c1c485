"""Serve end to end on loopback: real Ray Serve, real HTTP, the real `openai` client.

One application for the module (Serve start and deploy take ~10-30 s here): a pool of
generators (the tiny LLaVA, a known-answer oracle, and a relay that reaches the tiny one
through the openai backend and this same HTTP endpoint) and judges (the tiny LLaVA in
logprob mode, the reference judge with scripted replies, and a remote judge reached
through the openai backend).
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
from pathlib import Path

import pytest
import requests
from support.s3 import free_port
from PIL import Image

# Set at import (collection), before any fixture starts Ray: replicas see the environment
# Ray started with. The value is a stand-in for a real key; tests check it is never logged.
KEY_ENV, KEY = "VLIT_TEST_OPENAI_KEY", "sk-vlit-test-" + "0123456789abcdef"
os.environ[KEY_ENV] = KEY

pytestmark = pytest.mark.timeout(420)

ORACLE_REPLY = "Rating: 4\nRationale: The response names the object in the image."
MALFORMED = "I would give this a four out of five."


def png(size=(24, 24), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory, s3):
    from ray import serve

    from vlit.config import ServeConfig
    from vlit.serve.app import start

    port = free_port()
    images = tmp_path_factory.mktemp("images")
    tiny = {"kind": "hf", "model": {"preset": "tiny", "max_len": 2048}, "threads": 1}
    small = {"num_cpus": 0.1, "max_ongoing_requests": 32, "batch": {"max_batch_size": 8}}
    cfg = ServeConfig.model_validate({
        "http": {"host": "127.0.0.1", "port": port, "request_timeout_s": 120},
        "images": {"max_bytes": 16 * 1024, "max_pixels": 256 * 256, "uri_roots": [str(images), "s3://vlit-test/images"]},
        "request_timeout_s": 90,
        "generators": {
            "tiny": {"backend": tiny, "max_new_tokens": 32,
                     "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 32, "batch": {"max_batch_size": 8}}},
            "oracle": {"backend": {"kind": "reference", "replies": [ORACLE_REPLY]}, "deployment": small},
            "relay": {"backend": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny",
                                  "api_key_env": KEY_ENV}, "deployment": small},
        },
        "judges": {
            "tiny": {"backend": tiny, "mode": "logprob", "max_new_tokens": 24,
                     "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 64, "batch": {"max_batch_size": 32}}},
            "reference": {"backend": {"kind": "reference", "replies": [ORACLE_REPLY, MALFORMED]},
                          "mode": "generate", "deployment": small},
            "remote": {"backend": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "oracle",
                                   "api_key_env": KEY_ENV}, "mode": "generate", "deployment": small},
        },
    })
    handle = start(cfg)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "images": images, "handle": handle, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app):
    import openai

    return openai.OpenAI(base_url=app["url"] + "/v1", api_key="unused-by-this-server", max_retries=0, timeout=120)


def chat(url: str, body, **kw) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", json=body, timeout=120, **kw)


def judge(url: str, body) -> requests.Response:
    return requests.post(url + "/v1/judge", json=body, timeout=120)


def image_message(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_proxy_listens_on_loopback_only(app):
    import psutil

    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == app["port"]]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)


def test_models_lists_the_pool_and_the_judges(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"tiny", "oracle", "relay", "reference", "remote"} | {"tiny"}


def test_openai_client_gets_n_samples_with_an_image_and_seeds_repeat(client):
    kwargs = dict(model="tiny", messages=image_message("What is shown?", data_url(png())), n=2, max_tokens=8,
                  temperature=0.9, top_p=0.95, seed=7)
    first = client.chat.completions.create(**kwargs)
    assert first.object == "chat.completion" and first.model == "tiny" and len(first.choices) == 2
    assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in first.choices)
    assert first.usage.prompt_tokens > 16 and 0 < first.usage.completion_tokens <= 16
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    text_only = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                               messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hello"}])
    assert len(text_only.choices) == 1 and text_only.usage.completion_tokens <= 4


def test_the_model_name_picks_the_generator(client):
    oracle = client.chat.completions.create(model="oracle", messages=[{"role": "user", "content": "How many?"}],
                                            extra_body={"reference": "three dogs"})
    assert oracle.model == "oracle" and oracle.choices[0].message.content == "three dogs"


def test_images_by_uri_under_the_roots(app, client, s3):
    import boto3

    path = app["images"] / "cat.png"
    path.write_bytes(png(color="blue"))
    boto3.client("s3").put_object(Bucket="vlit-test", Key="images/dog.png", Body=png(color="green"))
    for uri in (str(path), "file://" + str(path), "s3://vlit-test/images/dog.png"):
        out = client.chat.completions.create(model="tiny", messages=image_message("Describe.", uri), max_tokens=2)
        assert out.choices[0].message.content is not None
    r = chat(app["url"], {"model": "tiny", "messages": image_message("Describe.", "/etc/hostname")})
    assert r.status_code == 400 and "outside the allowed roots" in r.json()["error"]["message"]


BAD_CHATS = [
    ({"model": "tiny", "messages": image_message("x", data_url(b"\x89PNG" + os.urandom(20000)))}, 413, "limit is 16384 bytes"),
    ({"model": "tiny", "messages": image_message("x", data_url(png((300, 300))))}, 413, "300x300"),
    ({"model": "tiny", "messages": image_message("x", data_url(b"this is not an image"))}, 400, "not an image"),
    ({"model": "tiny", "messages": image_message("x", "data:image/png;base64,@@@")}, 400, "not valid base64"),
    ({"model": "tiny"}, 400, "messages: Field required"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model: Field required"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages.0.content: Field required"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "unknown generator 'gpt-9'; generators here: ['oracle', 'relay', 'tiny']"),
    ({"model": "reference", "messages": [{"role": "user", "content": "hi"}]}, 404, "is a judge: use /v1/judge"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 33}, 400, "at most 32"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "streaming"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message must be the user's"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 3000}]}, 400, "context is 2048 tokens"),
    ({"model": "oracle", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400,
     "temperature: Input should be less than or equal to 2"),
]


@pytest.mark.parametrize("body, status, words", BAD_CHATS, ids=[w[:24] for _, _, w in BAD_CHATS])
def test_bad_chat_requests_get_4xx_and_the_replica_serves_on(app, client, body, status, words):
    r = chat(app["url"], body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert len(ok.choices) == 1


def test_bad_requests_through_the_openai_client_raise_with_the_message(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="unknown generator 'nope'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.chat.completions.create(model="tiny", messages=image_message("x", data_url(b"plain bytes")))


def test_bad_json_and_bad_judge_requests(app):
    r = requests.post(app["url"] + "/v1/chat/completions", data=b"{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    for body, status, words in [
        ({"model": "tiny", "response": "r"}, 400, "instruction: Field required"),
        ({"model": "tiny", "instruction": "i", "response": "r", "aspects": ["humor"]}, 400, "aspects.0"),
        ({"model": "tiny", "instruction": "i", "response": "r", "scores": 1}, 400, "scores: Extra inputs"),
        ({"model": "gpt-4v", "instruction": "i", "response": "r"}, 404, "unknown judge 'gpt-4v'"),
        ({"instruction": "i", "response": "r"}, 400, "name the judge"),
        ({"model": "reference", "instruction": "i", "response": "r", "reference": "..."}, 400, "no words"),
        ({"model": "tiny", "instruction": "i", "response": "r", "image": data_url(b"GIF89a-broken")}, 400, "not an image"),
    ]:
        r = judge(app["url"], body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert judge(app["url"], {"model": "tiny", "instruction": "i", "response": "r"}).status_code == 200


def test_judge_logprob_gives_distributions(app):
    r = judge(app["url"], {"model": "tiny", "instruction": "What color is the square?", "response": "It is red.",
                           "image": data_url(png())})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == "logprob" and out["unparseable"] is False and set(out["scores"]) == {
        "helpfulness", "visual_faithfulness", "ethical_considerations"}
    for s in out["scores"].values():
        assert s["status"] == "ok" and len(s["distribution"]) == 5
        assert sum(s["distribution"]) == pytest.approx(1.0, abs=1e-5) and min(s["distribution"]) >= 0
        assert s["rating"] == pytest.approx(sum((k + 1) * p for k, p in enumerate(s["distribution"])), abs=1e-6)


def test_judge_batched_scores_equal_one_at_a_time(app):
    """Concurrent requests share batches (left-padded, different lengths); each request's
    scores must not depend on what it was batched with."""
    bodies = [{"model": "tiny", "instruction": "Describe the image. " * (1 + i % 4), "response": f"Answer {i}. " * (i % 3 + 1),
               "image": data_url(png(color=("red", "green", "blue")[i % 3])) if i % 2 else None,
               "aspects": ["helpfulness", "visual_faithfulness"]} for i in range(12)]
    bodies = [{k: v for k, v in b.items() if v is not None} for b in bodies]
    alone = [judge(app["url"], b).json() for b in bodies]
    together: list = [None] * len(bodies)

    def send(i):
        together[i] = judge(app["url"], bodies[i]).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(alone, together):
        for aspect in a["scores"]:
            assert b["scores"][aspect]["distribution"] == pytest.approx(a["scores"][aspect]["distribution"], abs=1e-5)
    stats = requests.get(app["url"] + "/health", timeout=30).json()["deployments"]["judge/tiny"]
    assert stats["largest_batch"] > 1, stats


def test_judge_generate_mode_marks_unparseable_replies(app):
    # The tiny model's weights are random: its reply is not in the rubric's format.
    r = judge(app["url"], {"model": "tiny", "instruction": "Describe.", "response": "A red square.", "mode": "generate",
                           "aspects": ["helpfulness"]}).json()
    s = r["scores"]["helpfulness"]
    assert r["mode"] == "generate" and r["unparseable"] is True
    assert s["status"] == "unparseable" and s["rating"] is None and s["distribution"] is None and s["raw"]
    # Scripted replies: one in the format, one not; the second is returned raw, never scored.
    r = judge(app["url"], {"model": "reference", "instruction": "What is it?", "response": "A cat.",
                           "aspects": ["helpfulness", "visual_faithfulness"]}).json()
    assert r["unparseable"] is True
    assert r["scores"]["helpfulness"] == {"status": "ok", "rating": 4.0, "distribution": None,
                                          "rationale": "The response names the object in the image.", "raw": ORACLE_REPLY}
    assert r["scores"]["visual_faithfulness"] == {"status": "unparseable", "rating": None, "distribution": None,
                                                  "rationale": None, "raw": MALFORMED}


def test_reference_judge_rates_known_answers(app):
    right = judge(app["url"], {"model": "reference", "instruction": "How many dogs?", "response": "There are three dogs.",
                               "reference": "three"}).json()
    wrong = judge(app["url"], {"model": "reference", "instruction": "How many dogs?", "response": "Two cats.",
                               "reference": "three", "mode": "logprob"}).json()
    assert right["scores"]["visual_faithfulness"]["rating"] == 5 and right["unparseable"] is False
    assert right["scores"]["ethical_considerations"]["status"] == "unrated"
    assert wrong["scores"]["visual_faithfulness"]["rating"] == 1
    assert wrong["scores"]["visual_faithfulness"]["distribution"] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_openai_backend_against_our_own_endpoint(app, client):
    """The relay generator and the remote judge call this server's /v1 through the openai
    backend: both sides of the OpenAI protocol, and the key stays out of every log."""
    relayed = client.chat.completions.create(model="relay", messages=image_message("What?", data_url(png())),
                                             max_tokens=4, temperature=0)
    direct = client.chat.completions.create(model="tiny", messages=image_message("What?", data_url(png())),
                                            max_tokens=4, temperature=0)
    assert relayed.choices[0].message.content == direct.choices[0].message.content
    r = judge(app["url"], {"model": "remote", "instruction": "What is it?", "response": "A red square.",
                           "image": data_url(png())}).json()
    assert r["unparseable"] is False
    assert all(s["status"] == "ok" and s["rating"] == 4.0 for s in r["scores"].values())
    # An upstream 4xx comes back as a 4xx naming the upstream's message.
    bad = chat(app["url"], {"model": "relay", "messages": [{"role": "user", "content": "x " * 3000}]})
    assert bad.status_code == 400 and "upstream endpoint answered 400" in bad.json()["error"]["message"]

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key appears in {leaked}"


def test_health_reports_every_deployment(app):
    out = requests.get(app["url"] + "/health", timeout=30).json()
    assert out["status"] == "ok" and set(out["deployments"]) == {
        "generator/tiny", "generator/oracle", "generator/relay", "judge/tiny", "judge/reference", "judge/remote"}


def test_ray_data_helper_keeps_inputs_and_captures_errors_per_row(app, ray_local):
    import ray

    from vlit.serve.client import map_requests

    good = data_url(png())
    rows = [
        {"model": "tiny", "instruction": "Describe.", "response": "A red square.", "image": good},
        {"model": "nobody", "instruction": "Describe.", "response": "A red square.", "image": good},
        {"model": "tiny", "instruction": "Describe.", "response": "A red square.", "image": data_url(b"no image")},
        {"model": "reference", "instruction": "How many?", "response": "three", "image": good},
    ]
    out = sorted(map_requests(ray.data.from_items(rows), method="judge", batch_size=4).take_all(),
                 key=lambda r: rows.index({k: r[k] for k in rows[0]}))
    assert [r["status"] for r in out] == [200, 404, 400, 200]
    assert [r["attempts"] for r in out] == [1, 1, 1, 1]  # 4xx are not retried
    for row, got in zip(rows, out):
        assert {k: got[k] for k in row} == row  # the input stays with its result
    assert json.loads(out[0]["result"])["scores"]["helpfulness"]["status"] == "ok" and out[0]["error"] is None
    assert out[1]["result"] is None and "unknown judge 'nobody'" in out[1]["error"]
    assert "not an image" in out[2]["error"]
    chats = [{"request": json.dumps({"model": "oracle", "messages": [{"role": "user", "content": "q"}],
                                     "reference": "ok"})},
             {"request": "{broken"}]
    got = map_requests(ray.data.from_items(chats), method="chat", request_column="request").take_all()
    by_status = {r["status"]: r for r in got}
    assert json.loads(by_status[200]["result"])["choices"][0]["message"]["content"] == "ok"
    assert "not valid JSON" in by_status[400]["error"]


def test_ray_data_helper_retries_what_may_pass(ray_local, app):
    """A deployment that is at capacity once per row: every row succeeds on its second try."""
    from ray import serve
    from ray.serve.exceptions import BackPressureError

    from vlit.serve.client import map_requests

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class OnceBusy:
        def __init__(self):
            self.seen = set()

        def __call__(self, body: dict) -> dict:
            if body["x"] not in self.seen:
                self.seen.add(body["x"])
                raise BackPressureError(num_queued_requests=1, max_queued_requests=1)
            return {"x": body["x"]}

    serve.run(OnceBusy.bind(), name="once-busy", route_prefix=None)
    try:
        import ray

        out = map_requests(ray.data.from_items([{"x": i} for i in range(5)]), app_name="once-busy",
                           method="__call__", backoff_s=0.05).take_all()
        assert sorted((r["x"], r["status"], r["attempts"]) for r in out) == [(i, 200, 2) for i in range(5)]
    finally:
        serve.delete("once-busy")
