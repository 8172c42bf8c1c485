"""What goes over the wire: OpenAI chat completions, the judge endpoint, and errors.

Requests are validated here, in the ingress, before any model replica sees them: a bad
request becomes a `RequestError` whose status (4xx) and message reach the caller, and the
replicas keep serving. Images arrive as base64 data URLs or as URIs under configured roots
(local paths, file://, s3://) and are size-checked before they are decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
from typing import Annotated, Literal
from urllib.parse import unquote

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlit import storage
from vlit.config import ASPECTS, Aspect, ImageLimitsConfig


class RequestError(Exception):
    """A request that cannot be served as sent. `status` is the HTTP status (4xx for the
    caller's mistakes, 5xx for ours); the message says what is wrong."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_request", 404: "model_not_found", 413: "too_large",
                             503: "overloaded", 504: "timeout"}.get(status, "error")

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (RequestError, (self.status, self.message, self.param, self.code))

    def body(self) -> dict:
        """OpenAI's error shape, so the `openai` client raises with this message."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_message(err: ValidationError) -> str:
    """One line per problem, each naming the field's path (`messages.0.content`)."""
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<body>"
        parts.append(f"{path}: {e['msg']}")
    return "invalid request: " + "; ".join(parts)


def parse(model: type[BaseModel], body) -> BaseModel:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestError(400, validation_message(e)) from None


# ---- OpenAI chat completions -------------------------------------------------------------

class _Open(BaseModel):
    # OpenAI clients send parameters this server does not use (user, metadata, ...):
    # ignored, as OpenAI-compatible servers do. Our own endpoints forbid unknown fields.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str
    detail: str | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatCompletionRequest(_Open):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    logprobs: bool | None = None
    # Extension (send with the openai client's extra_body): the known answer, used by the
    # `reference` backend for tasks whose answer is known.
    reference: str | None = None

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported by this server; send stream=false")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not returned by this server; the judge endpoint scores ratings")
        return v


def completion_response(model: str, texts: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    """A `chat.completion` object; `texts` holds (text, finish_reason) per choice."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
             "logprobs": None}
            for i, (text, reason) in enumerate(texts)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


# ---- The judge endpoint: POST /v1/judge ----------------------------------------------------

class JudgeRequest(BaseModel):
    """One response to rate, on the VLFeedback rubric."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # the judge's name; may be left out when there is one judge
    instruction: str = Field(min_length=1)
    response: str
    image: str | None = None  # base64 data URL or URI
    reference: str | None = None  # the known answer (needed by the `reference` judge)
    aspects: list[Aspect] = Field(default_factory=lambda: list(ASPECTS), min_length=1)
    mode: Literal["logprob", "generate"] | None = None  # default: the judge's configured mode

    @field_validator("aspects")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("aspects must not repeat")
        return v


class AspectScore(BaseModel):
    # ok: rated; unparseable: the judge's reply did not follow the format (see `raw`), and
    # no rating is made up; unrated: this judge cannot rate the aspect (see `rationale`).
    status: Literal["ok", "unparseable", "unrated"]
    rating: float | None = None  # logprob: expected rating; generate: the judge's digit
    distribution: list[float] | None = None  # logprob: P(rating = 1..5)
    rationale: str | None = None
    raw: str | None = None  # the judge's reply as written (generate mode)


class JudgeResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"judge-{uuid.uuid4().hex}")
    object: Literal["judgement"] = "judgement"
    model: str
    mode: Literal["logprob", "generate"]
    scores: dict[str, AspectScore]
    unparseable: bool  # true when any aspect's reply did not parse


# ---- Images ------------------------------------------------------------------------------

def _check_size(nbytes: int, limits: ImageLimitsConfig, what: str) -> None:
    if nbytes > limits.max_bytes:
        raise RequestError(413, f"{what} is {nbytes} bytes; the limit is {limits.max_bytes} bytes")


def _dot_segments(uri: str) -> bool:
    """Whether `uri`, percent-decoded as often as it decodes, has a `.` or `..` segment."""
    while (decoded := unquote(uri)) != uri:
        uri = decoded
    return any(segment in (".", "..") for segment in re.split(r"[/\\]", uri))


def _under_roots(uri: str, roots: list[str]) -> bool:
    # storage.normalize resolves `..` the way our clients do, so the check holds for what is
    # fetched; dot segments are refused outright anyway, encoded ones too: our S3 client
    # sends `%2e%2e` as a literal key, but a gateway or store that decodes it would not.
    if _dot_segments(uri):
        return False
    target = storage.normalize(uri)
    for root in roots:
        root = storage.normalize(root).rstrip("/")
        if target == root or target.startswith(root + "/"):
            return True
    return False


def image_bytes(url: str, limits: ImageLimitsConfig) -> bytes:
    """The encoded bytes behind a data URL or an allowed URI; never more than the limit."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(400, "an image data URL must be base64: data:image/<type>;base64,<data>")
        if not header[len("data:"):].startswith("image/"):
            raise RequestError(400, f"an image data URL must have an image/* media type, got {header[5:].split(';')[0]!r}")
        # Checked before decoding: base64 is 4 characters per 3 bytes.
        _check_size(len(payload) * 3 // 4, limits, "the image")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "the image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise RequestError(400, "http(s) image URLs are not fetched by this server; send a base64 data URL "
                                "or a URI under the configured image roots")
    if not limits.uri_roots:
        raise RequestError(400, "this server takes images as base64 data URLs only (no image URI roots are configured)")
    if not _under_roots(url, limits.uri_roots):
        raise RequestError(400, f"image URI {url!r} is outside the allowed roots {limits.uri_roots}")
    fs, path = storage.filesystem(url)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise RequestError(400, f"image URI {url!r} cannot be read: {e}") from None
    if info.type.name != "File":
        raise RequestError(400, f"image URI {url!r} does not name a file")
    _check_size(info.size, limits, f"image {url!r}")
    return storage.read_bytes(url)


def load_image(url: str, limits: ImageLimitsConfig) -> Image.Image:
    """A decoded RGB image, or a RequestError that says why not."""
    data = image_bytes(url, limits)
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size  # the header only: dimensions are checked before decoding
    except Exception:
        raise RequestError(400, "the image bytes are not an image this server can read "
                                "(expected PNG, JPEG, GIF, BMP or WEBP)") from None
    if width * height > limits.max_pixels:
        raise RequestError(413, f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:
        raise RequestError(400, f"the image could not be decoded: {e}") from None


def data_url(img: Image.Image) -> str:
    """PNG data URL of an image: how images travel on to OpenAI-compatible endpoints."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
