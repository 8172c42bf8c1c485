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
import random
import time

import pyarrow as pa
import ray
import ray.data
from ray import serve

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
        out: list[dict] = [{"result": None, "error": None, "status": None, "attempts": 0} for _ in rows]
        pending = list(range(len(rows)))
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (1 + random.random() / 2))
            calls = {i: (requests[i] if isinstance(requests[i], RequestError) else self.handle.remote(requests[i]))
                     for i in pending}
            pending = []
            for i, call in calls.items():
                out[i]["attempts"] += 1
                try:
                    if isinstance(call, RequestError):
                        raise call
                    out[i].update(result=json.dumps(call.result(timeout_s=self.timeout_s)), error=None, status=200)
                except Exception as e:
                    status, message = _classify(e)
                    out[i].update(error=message, status=status)
                    if status in RETRYABLE_STATUS:
                        pending.append(i)
            if not pending:
                break
        return pa.Table.from_pylist([{**row, **res} for row, res in zip(rows, out)])


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
