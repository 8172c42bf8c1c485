"""The Serve HTTP API with a bearer token (`serve.http.token_env`): requests without it
or with a wrong one get 401 and the replica keeps serving; the token is read from the
environment, so no config or log holds it."""
from __future__ import annotations

import os

import pytest
import requests

from support.s3 import free_port

# Set at import (collection), before any fixture starts Ray: replicas see the environment
# Ray started with.
TOKEN_ENV, TOKEN = "VLIT_TEST_SERVE_TOKEN", "tok-vlit-test-" + "fedcba9876543210"
os.environ[TOKEN_ENV] = TOKEN

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def app(ray_local):
    from ray import serve

    from vlit.config import ServeConfig
    from vlit.serve.app import start

    port = free_port()
    cfg = ServeConfig.model_validate({
        "app_name": "auth",
        "http": {"host": "127.0.0.1", "port": port, "token_env": TOKEN_ENV},
        "generators": {"oracle": {"backend": {"kind": "reference", "replies": ["A red circle."]},
                                  "deployment": {"num_cpus": 0.1}}},
    })
    start(cfg)
    yield {"url": f"http://127.0.0.1:{port}", "cfg": cfg}
    serve.shutdown()


def test_requests_without_the_token_get_401(app):
    body = {"model": "oracle", "messages": [{"role": "user", "content": "What is shown?"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = requests.post(app["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in r.json()["error"]["message"] and TOKEN not in r.text
        assert requests.get(app["url"] + "/v1/models", headers=headers, timeout=60).status_code == 401
    ok = requests.get(app["url"] + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert ok.status_code == 200 and [m["id"] for m in ok.json()["data"]] == ["oracle"]


def test_the_openai_client_with_the_token_is_served(app):
    import openai

    good = openai.OpenAI(base_url=app["url"] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    out = good.chat.completions.create(model="oracle", messages=[{"role": "user", "content": "What is shown?"}])
    assert out.choices[0].message.content == "A red circle."
    bad = openai.OpenAI(base_url=app["url"] + "/v1", api_key="not-the-token", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="oracle", messages=[{"role": "user", "content": "What is shown?"}])
    # The config names the variable, never the token.
    assert TOKEN not in app["cfg"].model_dump_json()
