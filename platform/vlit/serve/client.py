"""A dataset of requests through the Serve application, from Ray Data.

    out = map_requests(ds, method="judge")        # rows: JudgeRequest fields
    out = map_requests(ds, method="chat")         # rows: chat completion request fields
    out = map_requests(ds, method="chat", request_column="request")  # a column of JSON text

A column of JSON text suits requests whose shapes differ between rows (Arrow columns
have one type each: a message content that is a string in one row and a list of parts in
another cannot share a column).

Each output row keeps its input columns and adds:
- `result`: the response as JSON text (a chat.completion or a judgement), or null;
- `error`: what went wrong, or null; `status`: the HTTP-style status (200 when served);
- `attempts`: how many times the row was sent.

Rows of a block are sent concurrently through the ingress's DeploymentHandle, so the
deployments' dynamic batches fill. Failures that may pass (the deployment at capacity,
a timeout, a replica that died) are retried with exponential backoff; a request the
server rejected (4xx) is not, and neither its error nor any other stops the dataset.
"""
from __future__ import annotations

import json

import pyarrow as pa
import ray
import ray.data
from ray import serve

from vlit import retry
from vlit.progress import track
from vlit.serve.protocol import RequestError

RETRYABLE_STATUS = {500, 502, 503, 504}
OUTPUT_COLUMNS = ("result", "error", "status", "attempts")


def _classify(e: BaseException) -> tuple[int, str]:
    """(status, message) of a failed call."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
    if isinstance(cause, RequestError):
        return cause.status, cause.message
    if isinstance(cause, BackPressureError):
        return 503, f"at capacity: {cause}"
    if isinstance(cause, TimeoutError):
        return 504, f"timed out: {cause}"
    return 500, f"{type(cause).__name__}: {cause}"


class _Caller:
    def __init__(self, app_name: str, method: str, retries: int, backoff_s: float, timeout_s: float,
                 request_column: str | None):
        self.handle = serve.get_app_handle(app_name).options(method_name=method)
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.request_column = request_column

    def _request(self, row: dict):
        if self.request_column is None:
            return {k: v for k, v in row.items() if v is not None}  # Arrow's nulls: fields not sent
        value = row[self.request_column]
        if isinstance(value, (str, bytes)):
            try:
                return json.loads(value)
            except ValueError as e:
                return RequestError(400, f"{self.request_column}: not valid JSON: {e}")
        return value

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests = [self._request(row) for row in rows]
        clash = set(OUTPUT_COLUMNS) & set(batch.column_names)
        if clash:
            raise ValueError(f"input columns {sorted(clash)} would be overwritten by the output columns {OUTPUT_COLUMNS}")
        results, tries = retry.in_rounds(requests, self._send, attempts=self.retries + 1,
                                         retryable=lambda e: _classify(e)[0] in RETRYABLE_STATUS,
                                         base_s=self.backoff_s, cap_s=30.0)
        out = []
        for row, result, n in zip(rows, results, tries):
            if isinstance(result, BaseException):
                status, message = _classify(result)
                out.append({**row, "result": None, "error": message, "status": status, "attempts": n})
            else:
                out.append({**row, "result": json.dumps(result), "error": None, "status": 200, "attempts": n})
        return pa.Table.from_pylist(out)

    def _send(self, requests: list) -> list:
        """One round: every request in flight at once (so the deployments' batches fill),
        then each answer or its exception."""
        calls = [r if isinstance(r, RequestError) else self.handle.remote(r) for r in requests]
        outs = []
        for call in calls:
            try:
                if isinstance(call, RequestError):
                    raise call
                outs.append(call.result(timeout_s=self.timeout_s))
            except Exception as e:  # noqa: BLE001 - classified by the caller
                outs.append(e)
        return outs


def map_requests(ds: "ray.data.Dataset", *, method: str = "judge", app_name: str = "vlit", retries: int = 3,
                 backoff_s: float = 0.5, timeout_s: float = 120.0, batch_size: int = 64,
                 concurrency: int = 1, request_column: str | None = None) -> "ray.data.Dataset":
    """`ds` (rows of request fields) through a method of the app's ingress: `chat` or
    `judge` for a vlit app (any method of another app's ingress that takes one request)."""
    return ds.map_batches(
        _Caller,
        fn_constructor_kwargs=dict(app_name=app_name, method=method, retries=retries, backoff_s=backoff_s,
                                   timeout_s=timeout_s, request_column=request_column),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        # The work happens in Serve replicas; these actors only wait on handles.
        num_cpus=0.1,
    )


def serve_calls(requests: list[dict], *, method: str, app_name: str = "vlit", batch_size: int = 64,
                timeout_s: float = 120.0) -> list[tuple[dict | None, str | None]]:
    """Each request through the app's ingress with `map_requests` (Ray Data, retries,
    per-row errors): (result, error) per request, in order. For the loops' small batches."""
    if not requests:
        return []
    items = [{"idx": i, "request": json.dumps(r)} for i, r in enumerate(requests)]
    ds = map_requests(ray.data.from_items(items), method=method, app_name=app_name, request_column="request",
                      batch_size=batch_size, timeout_s=timeout_s)
    out: list[tuple[dict | None, str | None]] = [(None, "no answer")] * len(requests)
    for row in track(ds.iter_rows(), method, len(requests), "requests"):
        result = json.loads(row["result"]) if row["result"] else None
        out[row["idx"]] = (result, None if result is not None else f"{row['status']}: {row['error']}")
    return out


def chat_texts(result: dict | None) -> list[str]:
    """The completions' texts of a chat.completion result (none for a failed call)."""
    return [c["message"]["content"] for c in result["choices"]] if result else []


def user_message(text: str, image: str | None) -> dict:
    """An OpenAI chat user message, with the image as an image_url part when there is one."""
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "text", "text": text}]}
