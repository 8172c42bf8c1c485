"""Promotion gates: a stage's model is promoted only when its metrics pass thresholds.

`eval.gates` maps a metric name to its lower bound: `{"mme.perception": 1200,
"pope.adversarial.f1": 0.8, "mmbench.accuracy": 0.6, "synthetic.forgetting.min_delta":
-0.05}` (every gate is "at least"; forgetting is bounded through its worst delta, a
negative number). A gate on a metric
that was not measured fails: a misspelt name or a suite left out must not pass silently.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateResult:
    metric: str
    threshold: float
    value: float | None  # None: not measured
    passed: bool

    @property
    def reason(self) -> str:
        if self.value is None:
            return f"{self.metric} was not measured (gate: >= {self.threshold:g})"
        verdict = "passes" if self.passed else "is below"
        return f"{self.metric} = {self.value:.4f} {verdict} its threshold {self.threshold:g}"


class GateFailed(RuntimeError):
    """A stage's metrics failed its gates; `reasons` name each metric, value and threshold."""

    def __init__(self, stage: str, results: list[GateResult]):
        self.stage, self.results = stage, results
        self.reasons = [r.reason for r in results if not r.passed]
        super().__init__(f"stage {stage} failed its evaluation gates: " + "; ".join(self.reasons))


def check_gates(metrics: dict[str, float], gates: dict[str, float]) -> list[GateResult]:
    """One result per gate, in the gates' order."""
    results = []
    for metric, threshold in gates.items():
        value = metrics.get(metric)
        if value is not None and math.isnan(value):
            value = None  # NaN passes no comparison: report it as not measured
        results.append(GateResult(metric, float(threshold), value, value is not None and value >= threshold))
    return results


def enforce_gates(metrics: dict[str, float], gates: dict[str, float], stage: str) -> list[GateResult]:
    """`check_gates`, raising `GateFailed` when any gate fails."""
    results = check_gates(metrics, gates)
    if not all(r.passed for r in results):
        raise GateFailed(stage, results)
    return results


def gates_json(results: list[GateResult]) -> dict:
    """The gate verdicts as logged with the run (`eval/gates.json`)."""
    return {"passed": all(r.passed for r in results),
            "gates": [{**asdict(r), "reason": r.reason} for r in results]}


def promote(tracking_uri: str, model_name: str, version: str | int, alias: str) -> None:
    """Point registered model `model_name`'s `alias` at `version` (the registry's
    "promoted" pointer: serving resolves models:/NAME@ALIAS)."""
    from vlit import lineage

    lineage.set_model_alias(tracking_uri, model_name, version, alias)


def gate_and_promote(tracking_uri: str, metrics: dict[str, float], gates: dict[str, float], *, stage: str,
                     model_name: str, version: str | int, alias: str, run_id: str | None = None) -> list[GateResult]:
    """Check the stage's gates, record the verdict on its run, and promote the model
    version when every gate passes; raise `GateFailed` (nothing promoted) otherwise."""
    from vlit import lineage

    results = check_gates(metrics, gates)
    if run_id:
        passed = all(r.passed for r in results)
        lineage.log_eval({"uri": tracking_uri, "run_id": run_id}, texts={"eval/gates.json": json.dumps(gates_json(results), indent=2)},
                          tags={"vlit.gate": "passed" if passed else "failed",
                                "vlit.gate.reasons": "; ".join(r.reason for r in results if not r.passed)[:5000]})
    enforce_gates(metrics, gates, stage)
    promote(tracking_uri, model_name, version, alias)
    return results
