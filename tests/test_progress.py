"""vlit.progress as a person reads it: plain lines in logs, a live bar on a terminal."""
from __future__ import annotations

import io
import re
import time

import pytest

from vlit.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_output_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("VLIT_PROGRESS", raising=False)
    out = io.StringIO()
    with Progress("sft1", total=400, unit="steps", stream=out, interval_s=0) as p:
        p.update(10, loss=2.3104, **{"tokens/s": 1234.4})
        p.update(30, loss=2.0)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\[vlit sft1\] 10/400 steps \(2%\) loss 2\.310 tokens/s 1234 eta \d+s", lines[0]), lines
    assert lines[1].startswith("[vlit sft1] 40/400 steps (10%) loss 2.000 tokens/s 1234 eta ")
    assert len(lines) == 2  # closing adds no line where the last one said it all
    assert "\r" not in out.getvalue()


def test_plain_lines_come_at_most_every_interval_and_a_short_step_prints_none():
    out = io.StringIO()
    with Progress("prepare", stream=out, interval_s=0.2) as p:  # unknown total
        for _ in range(1000):
            p.update(8)
        time.sleep(0.25)
        p.update(8)
    assert out.getvalue().splitlines() == ["[vlit prepare] 8008 rows in 0s"]  # the last one: not again
    quick = io.StringIO()
    with Progress("eval", total=64, unit="questions", stream=quick, interval_s=3600) as p:
        p.update(64)
    assert quick.getvalue() == ""


def test_a_resumed_step_counts_on_from_where_it_was():
    out = io.StringIO()
    with Progress("dpo", total=10, unit="steps", done=6, stream=out, interval_s=0) as p:
        p.update(1)
    assert out.getvalue().splitlines()[0].startswith("[vlit dpo] 7/10 steps (70%)")


def test_a_bound_is_shown_as_one_and_a_line_is_written_once(monkeypatch):
    """Packed SFT's total is an upper bound: "≤", no percentage. Lines go to the stream
    itself, not through print() (which Ray Train patches in workers to log each line again)."""
    import builtins

    monkeypatch.setattr(builtins, "print", lambda *a, **k: pytest.fail("progress went through print()"))
    out = io.StringIO()
    with Progress("sft", total=3000, unit="steps", stream=out, interval_s=0, bound=True) as p:
        p.update(300, loss=0.5)
    assert re.fullmatch(r"\[vlit sft\] 300/≤3000 steps loss 0\.500 eta ≤\d+s", out.getvalue().strip())


def test_a_live_bar_on_a_terminal_and_nothing_when_off(monkeypatch):
    monkeypatch.delenv("VLIT_PROGRESS", raising=False)
    term = Terminal()
    with Progress("eval", total=5, unit="questions", stream=term) as p:
        for _ in range(5):
            p.update(1, acc=0.5)
    shown = term.getvalue()
    assert "\r" in shown and "[vlit eval]" in shown and "5/5" in shown and "acc=0.500" in shown
    monkeypatch.setenv("VLIT_PROGRESS", "off")
    quiet = Terminal()
    with Progress("eval", total=5, stream=quiet, interval_s=0) as p:
        p.update(5)
    assert quiet.getvalue() == ""


def test_track_counts_what_is_consumed(capsys, monkeypatch):
    monkeypatch.delenv("VLIT_PROGRESS", raising=False)
    monkeypatch.setenv("VLIT_PROGRESS_S", "0")
    assert list(track(iter(range(7)), "chat", total=7, unit="requests")) == list(range(7))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and re.fullmatch(r"\[vlit chat\] 7/7 requests \(100%\) in \d+s", lines[-1]), lines
