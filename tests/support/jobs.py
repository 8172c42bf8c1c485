"""Reading what a job printed."""
from __future__ import annotations

import json
import re


def job_summary(stdout: str) -> dict:
    """A job's closing JSON summary: the last object that starts a line. Ray's worker
    logs may follow it on stdout, and may hold braces themselves."""
    decoder = json.JSONDecoder()
    for match in reversed(list(re.finditer(r"^\{", stdout, re.M))):
        try:
            value = decoder.raw_decode(stdout, match.start())[0]
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise AssertionError(f"no JSON summary in the job's output:\n{stdout[-2000:]}")
