"""Progress of every long step, from one place: a live bar on a terminal, a plain line every
few seconds elsewhere (CI, `ray job logs`, and Ray workers, whose output reaches the driver
through Ray's log forwarding, never a terminal).

    with Progress("sft1", total=400, unit="steps") as p:
        for ...:
            p.update(1, loss=2.31, **{"tokens/s": 1234})

A plain line: `[vlit sft1] 12/400 steps (3%) loss 2.310 tokens/s 1234 eta 3m12s`; a step
shorter than the interval prints none.
`VLIT_PROGRESS_S` sets the plain lines' interval (default 10 s); `VLIT_PROGRESS=plain`
forces plain lines on a terminal too, `VLIT_PROGRESS=off` turns progress off.
"""
from __future__ import annotations

import os
import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _value(v) -> str:
    if isinstance(v, float):  # a loss to 3 decimals, a rate of thousands to units
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


class Progress:
    """`done` of `total` (None: unknown) units of one step; `update` adds and shows."""

    def __init__(self, label: str, total: int | None = None, unit: str = "rows", *, done: int = 0,
                 stream=None, interval_s: float | None = None, bound: bool = False):
        # bound: `total` is an upper bound (the step may end sooner), shown as "≤total".
        self.label, self.total, self.unit, self.bound = label, total, unit, bound
        self.stream = stream or sys.stdout
        self.interval_s = float(os.environ.get("VLIT_PROGRESS_S", "10")) if interval_s is None else interval_s
        mode = os.environ.get("VLIT_PROGRESS", "auto")
        self.off = mode == "off"
        self.done = self.first = done  # done > 0: a resumed step (its ETA counts from here)
        self.fields = {}
        self.started = self.last = time.monotonic()
        self.shown = None  # `done` when the last plain line was printed
        self.bar = None
        if not self.off and mode != "plain" and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=None if bound else total, initial=done, desc=f"[vlit {label}]", unit=f" {unit}", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        if self.off:
            return
        if self.bar is not None:
            self.bar.set_postfix({k: _value(v) for k, v in fields.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last, self.shown = now, self.done
            self._write(self.line())

    def _write(self, line: str) -> None:
        # Not print(): in a Ray Train worker, Train patches print() to also log each
        # message through the root logger, and the driver then shows every line twice.
        self.stream.write(line + "\n")
        self.stream.flush()

    def line(self) -> str:
        """The plain line for where the step stands now."""
        at_most = "≤" if self.bound else ""
        count = f"{self.done}/{at_most}{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        parts = [f"[vlit {self.label}] {count}"]
        if self.total and not self.bound:
            parts.append(f"({100 * self.done / self.total:.0f}%)")
        parts += [f"{k} {_value(v)}" for k, v in self.fields.items()]
        elapsed = time.monotonic() - self.started
        if self.total and self.first < self.done < self.total:
            parts.append(f"eta {at_most}{_duration(elapsed * (self.total - self.done) / (self.done - self.first))}")
        else:
            parts.append(f"in {_duration(elapsed)}")
        return " ".join(parts)

    def close(self) -> None:
        """The bar's last state, or a last plain line for a step that showed progress or
        lasted an interval (a shorter one stays silent: a line per Ray Data block of an
        evaluation would be noise)."""
        long = self.shown is not None or time.monotonic() - self.started >= self.interval_s
        if self.bar is not None:
            self.bar.close()
        elif not self.off and self.done not in (self.first, self.shown) and long:
            self._write(self.line())
        self.off = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items, label: str, total: int | None = None, unit: str = "rows"):
    """`items`, counted through a Progress as they are consumed."""
    with Progress(label, total, unit) as p:
        for item in items:
            yield item
            p.update(1)
