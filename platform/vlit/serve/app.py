"""The Serve application: a pool of named generators and named judges behind one FastAPI
ingress.

    GET  /v1/models            the generators and judges served here
    POST /v1/chat/completions  OpenAI chat completions; `model` picks the generator
    POST /v1/judge             VLFeedback rubric scores (protocol.JudgeRequest -> JudgeResponse)
    GET  /health               every generator and judge answers, with its batch statistics

The ingress validates each request (fields, images, model name) before any model replica
sees it: bad requests get a 4xx with a message, and replicas only ever get valid work.
The ingress's `chat` and `judge` methods are the same path for DeploymentHandle callers
(the Ray Data helper in vlit.serve.client).

`build_app(ServeConfig)` builds the application; `start(ServeConfig)` runs it on this Ray
cluster with the proxy on `serve.http` (127.0.0.1 by default). `deploy_config(Config)` is
Ray Serve's own config file for the same application (a RayService's serveConfigV2);
its `import_path` names `app_builder`, which takes the serve section as `args`.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures'
# annotations at runtime (a string `Request` turns into a required query parameter).
import asyncio
import hmac
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from vlit.config import Config, ConfigError, DeploymentConfig, ServeConfig, format_errors, require
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.serve import llm
from vlit.serve.backends import GenerationRequest, JudgeItem, Message
from vlit.serve.generator import Generator
from vlit.serve.judge import Judge
from vlit.serve.protocol import (
    ChatCompletionRequest,
    JudgeRequest,
    JudgeResponse,
    RequestError,
    completion_response,
    load_image,
    parse,
)

api = FastAPI(title="vlit serve", description="generator pool (OpenAI chat completions) and VLFeedback judges")


def _cause(e: BaseException) -> BaseException:
    return e.cause if isinstance(e, RayTaskError) and e.cause is not None else e


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(status_code=e.status, content=e.body(), headers=headers)


def to_generation(req: ChatCompletionRequest, cfg: ServeConfig, max_new_limit: int) -> GenerationRequest:
    """An OpenAI chat request as the backends take it; images are read and decoded here."""
    messages, image = [], None
    for i, m in enumerate(req.messages):
        texts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content if p.type == "text"]
        if any(IMAGE_TOKEN in t for t in texts):
            raise RequestError(400, f"message text must not contain the image placeholder {IMAGE_TOKEN}; "
                                    "send images as image_url parts", param=f"messages.{i}.content")
        if isinstance(m.content, str):
            messages.append(Message(m.role, m.content))
            continue
        parts = [p for p in m.content if p.type == "image_url"]
        if parts and (image is not None or len(parts) > 1):
            raise RequestError(400, "one image per request is supported", param=f"messages.{i}.content")
        if parts and m.role != "user":
            raise RequestError(400, f"images go in user messages, not {m.role!r}", param=f"messages.{i}.content")
        if parts:
            image = load_image(parts[0].image_url.url, cfg.images)
        text = "\n".join(p.text for p in m.content if p.type == "text")
        messages.append(Message(m.role, text, image=bool(parts)))
    max_new = req.max_completion_tokens or req.max_tokens or max_new_limit
    if max_new > max_new_limit:
        raise RequestError(400, f"max_tokens is {max_new}; this generator allows at most {max_new_limit}",
                           param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return GenerationRequest(messages=messages, image=image, temperature=req.temperature, top_p=req.top_p,
                             n=req.n, max_new_tokens=max_new, seed=req.seed, stop=stop, reference=req.reference)


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, cfg: ServeConfig, generators: dict[str, DeploymentHandle], judges: dict[str, DeploymentHandle]):
        self.cfg, self.generators, self.judges = cfg, generators, judges
        self._token = None
        if cfg.http.token_env:
            self._token = os.environ.get(cfg.http.token_env)
            if not self._token:  # refusing to start beats serving open by mistake
                raise RuntimeError(f"serve.http.token_env names {cfg.http.token_env}, which is not set in the "
                                   "ingress replica's environment")

    # ---- the Python API (DeploymentHandle callers; the HTTP routes call these) --------------

    async def chat(self, body: dict) -> dict:
        req = parse(ChatCompletionRequest, body)
        name = self._known(req.model, self.generators, "generator")
        gen_req = await asyncio.to_thread(to_generation, req, self.cfg, self.cfg.generators[name].max_new_tokens)
        out = await self._call("generator", name, self.generators[name].generate, gen_req)
        texts = [(c.text, c.finish_reason) for c in out.completions]
        return completion_response(name, texts, out.prompt_tokens, sum(c.tokens for c in out.completions))

    async def judge(self, body: dict) -> dict:
        req = parse(JudgeRequest, body)
        if req.model is None and len(self.judges) != 1:
            raise RequestError(400, f"model: name the judge; judges here: {sorted(self.judges)}", param="model")
        name = self._known(req.model or next(iter(self.judges)), self.judges, "judge")
        jcfg = self.cfg.judges[name]
        image = await asyncio.to_thread(load_image, req.image, self.cfg.images) if req.image else None
        item = JudgeItem(req.instruction, req.response, image, req.reference, list(req.aspects),
                         req.mode or jcfg.mode, jcfg.max_new_tokens)
        scores = await self._call("judge", name, self.judges[name].score, item)
        return JudgeResponse(model=name, mode=item.mode, scores=scores,
                             unparseable=any(s.status == "unparseable" for s in scores.values())).model_dump()

    def models(self) -> dict:
        data = [{"id": n, "object": "model", "owned_by": "vlit", "kind": "generator",
                 "backend": c.backend.kind} for n, c in self.cfg.generators.items()]
        data += [{"id": n, "object": "model", "owned_by": "vlit", "kind": "judge",
                  "backend": c.backend.kind, "mode": c.mode} for n, c in self.cfg.judges.items()]
        return {"object": "list", "data": data}

    async def health(self) -> dict:
        out = {}
        for kind, pool in (("generator", self.generators), ("judge", self.judges)):
            for name, handle in pool.items():
                out[f"{kind}/{name}"] = await self._call(kind, name, handle.stats, timeout_s=10.0)
        return {"status": "ok", "deployments": out}

    def _known(self, name: str, pool: dict, kind: str) -> str:
        if name in pool:
            return name
        other = "judge" if kind == "generator" else "generator"
        hint = f" ({name!r} is a {other}: use /v1/judge)" if other == "judge" and name in self.judges else ""
        hint = hint or (f" ({name!r} is a generator: use /v1/chat/completions)" if name in self.generators else "")
        raise RequestError(404, f"unknown {kind} {name!r}{hint}; {kind}s here: {sorted(pool)}", param="model")

    async def _call(self, kind: str, name: str, method, arg=None, timeout_s: float | None = None):
        """One call to a model deployment, with the request timeout; its failures as
        RequestErrors (4xx from the replica's checks, 503 at capacity, 504 late, 500 else)."""
        response = method.remote(arg) if arg is not None else method.remote()
        timeout_s = timeout_s or self.cfg.request_timeout_s

        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestError(504, f"{kind} {name!r} did not answer within {timeout_s:g} s") from None
        except Exception as e:
            cause = _cause(e)
            if isinstance(cause, RequestError):
                raise RequestError(cause.status, cause.message, cause.param, cause.code) from None
            if isinstance(cause, BackPressureError):
                raise RequestError(503, f"{kind} {name!r} is at capacity; retry later") from None
            raise RequestError(500, f"{kind} {name!r} failed: {type(cause).__name__}: {cause}") from None

    # ---- HTTP -----------------------------------------------------------------------------

    def _check_token(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    async def _respond(self, fn, request: Request, json_body: bool = True):
        try:
            self._check_token(request)
            if not json_body:
                return await fn() if asyncio.iscoroutinefunction(fn) else fn()
            try:
                body = await request.json()
            except Exception:
                raise RequestError(400, "the request body is not valid JSON") from None
            return await fn(body)
        except RequestError as e:
            return _error(e)

    @api.get("/v1/models")
    async def models_http(self, request: Request):
        return await self._respond(self.models, request, json_body=False)

    @api.post("/v1/chat/completions")
    async def chat_http(self, request: Request):
        return await self._respond(self.chat, request)

    @api.post("/v1/judge")
    async def judge_http(self, request: Request):
        return await self._respond(self.judge, request)

    @api.get("/health")
    async def health_http(self, request: Request):
        return await self._respond(self.health, request, json_body=False)


def _options(name: str, d: DeploymentConfig) -> dict:
    return dict(
        name=name,
        num_replicas=d.num_replicas,
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        max_ongoing_requests=d.max_ongoing_requests,
        max_queued_requests=d.max_queued_requests,
        health_check_period_s=d.health_check_period_s,
        health_check_timeout_s=d.health_check_timeout_s,
        # A replica that cannot start (a missing package, a wrong path) fails the deploy
        # after a few tries instead of Serve's default twenty.
        max_constructor_retry_count=3,
    )


def _model_deployment(cls, kind: str, name: str, entry):
    """One named model of the pool, bound. A vllm backend's model runs in a Ray Serve LLM
    engine of its own (vlit/serve/llm.py) that this deployment forwards to."""
    if entry.backend.kind != "vllm":
        return cls.options(**_options(f"{kind}-{name}", entry.deployment)).bind(name, entry)
    engine = llm.llm_deployment(llm.model_id(kind, name), entry.backend, entry.deployment)
    return cls.options(**_options(f"{kind}-{name}", llm.front(entry.deployment))).bind(name, entry, engine)


def build_app(cfg: ServeConfig):
    generators = {n: _model_deployment(Generator, "generator", n, g) for n, g in cfg.generators.items()}
    judges = {n: _model_deployment(Judge, "judge", n, j) for n, j in cfg.judges.items()}
    return Router.options(**_options("ingress", cfg.ingress)).bind(cfg, generators, judges)


def app_builder(args: dict):
    """Ray Serve application builder (`import_path: vlit.serve.app:app_builder`): `args` is
    a vlit serve section, validated like any vlit config."""
    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(format_errors(e).replace("\n  ", "\n  serve.")) from None
    return build_app(cfg)


def http_options(cfg: ServeConfig) -> dict:
    return {"host": cfg.http.host, "port": cfg.http.port, "request_timeout_s": cfg.http.request_timeout_s}


def start(cfg: ServeConfig) -> DeploymentHandle:
    """Run the application on the connected Ray cluster; returns the ingress handle. The
    HTTP proxy binds `serve.http.host` (127.0.0.1 by default)."""
    from vlit import storage

    # Relative image roots mean "relative to where the config was loaded", not to the
    # working folder of a replica.
    cfg = cfg.model_copy(update={"images": cfg.images.model_copy(
        update={"uri_roots": [storage.normalize(r) for r in cfg.images.uri_roots]})})
    serve.start(http_options=http_options(cfg))
    from ray.serve.schema import LoggingConfig

    from vlit.runtime import is_verbose

    # A line per request and per replica call (3,200 in a demo) says nothing the results
    # and vlit's progress do not; warnings and errors still show, all of it with --verbose.
    quiet = LoggingConfig(log_level="DEBUG", enable_access_log=True) if is_verbose() else \
        LoggingConfig(log_level="WARNING", enable_access_log=False)
    return serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, logging_config=quiet)


def deploy_config(cfg: Config) -> dict:
    """Ray Serve's config file (ServeDeploySchema) for a vlit config's serve section: what a
    RayService carries as serveConfigV2, or `serve deploy` takes."""
    s = require(cfg, "serve", "Ray Serve's config file", "generators and judges")
    return {
        "http_options": http_options(s),
        "applications": [{
            "name": s.app_name,
            "route_prefix": s.route_prefix,
            "import_path": "vlit.serve.app:app_builder",
            "args": s.model_dump(mode="json"),
        }],
    }


def run_serve(cfg: Config) -> dict:
    """The serve job: start Ray (or join it), run the application, serve until SIGINT or
    SIGTERM, then shut Serve down. Returns the job's summary."""
    import signal
    import sys
    import threading
    import time

    from vlit.runtime import init_ray

    s = require(cfg, "serve", "the serve job", "see configs/serve/")
    # Handlers first: a signal while the deployments start stops the job once they have.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    init_ray(cfg.ray, cfg.run.workdir)
    started = time.monotonic()
    start(s)
    url = f"http://{s.http.host}:{s.http.port}{s.route_prefix.rstrip('/')}"
    print(f"serving {s.app_name} at {url}/v1 (generators {sorted(s.generators)}, judges {sorted(s.judges)})",
          file=sys.stderr, flush=True)
    stop.wait()
    serve.shutdown()
    return {"app": s.app_name, "url": url, "generators": sorted(s.generators), "judges": sorted(s.judges),
            "served_s": round(time.monotonic() - started, 1)}
