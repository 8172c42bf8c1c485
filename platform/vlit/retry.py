"""The one retry loop: items sent in rounds, the failures that may pass sent again after
an exponential back-off with full jitter (the AWS SDKs' "standard" mode: a random wait
between 0 and base * 2^(round-1), capped). Object-store reads (storage.py) retry one
call this way; the Serve client (serve/client.py) retries a block of requests, each
round's requests in flight together.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Sequence


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The wait before attempt `attempt + 1` (attempt counts from 1)."""
    return random.random() * min(base_s * 2.0 ** (attempt - 1), cap_s)


def in_rounds(items: Sequence, send: Callable[[list], list], *, attempts: int,
              retryable: Callable[[BaseException], bool], base_s: float, cap_s: float) -> tuple[list, list[int]]:
    """Each item's result (or the exception of its last attempt), and how many attempts it
    took. `send(items)` returns one result or exception per item, in order; an item whose
    exception is `retryable` goes into the next round, at most `attempts` rounds in all."""
    results: list = [None] * len(items)
    tries = [0] * len(items)
    pending = list(range(len(items)))
    for attempt in range(1, attempts + 1):
        outs = send([items[i] for i in pending])
        again = []
        for i, out in zip(pending, outs):
            results[i], tries[i] = out, tries[i] + 1
            if isinstance(out, BaseException) and retryable(out):
                again.append(i)
        pending = again
        if not pending or attempt == attempts:
            break
        time.sleep(backoff_s(attempt, base_s, cap_s))
    return results, tries


def call(fn: Callable[[], object], *, attempts: int, retryable: Callable[[BaseException], bool], base_s: float,
         cap_s: float):
    """`fn()` retried as `in_rounds` retries one item; raises its last exception."""
    def send(_items):
        try:
            return [fn()]
        except Exception as e:  # noqa: BLE001 - returned, then raised below unless retried
            return [e]

    [out], _ = in_rounds([None], send, attempts=attempts, retryable=retryable, base_s=base_s, cap_s=cap_s)
    if isinstance(out, BaseException):
        raise out
    return out
