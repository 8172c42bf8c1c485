"""A Serve model replica killed (`ray.kill`) while a generation or judging job runs
through `vlit.serve.client.map_requests` (what `vlit.serve.client.serve_calls` uses): the
rows that were in flight on it fail with a replica death, are retried on the surviving
replica, and every prompt id comes back exactly once, answered; Serve starts a new replica
in place of the dead one.

The kill is aimed: once the first rows have come back (the job is in its steady state), a
background thread polls each replica actor's count of ongoing requests and kills one
while it holds work, so the kill lands on rows the replica has accepted. (A request the
replica had not yet acknowledged when it died is re-routed by Serve itself and never
reaches the client's retries: a kill at the very start of the job, while the ingress's
router is still dispatching the first block, can hit only such requests.)
One application for the module: the tiny LLaVA as a generator and as a logprob judge,
two replicas each."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from support.s3 import free_port

APP = "replica-kill"
GENERATOR, JUDGE = "generator-tiny", "judge-tiny"
# Kill this long after the first rows came back, once the victim holds at least this many requests.
SETTLE_S, MIN_ONGOING = 0.5, 4
BLOCK = 64  # map_requests' batch_size (serve_calls' default): rows one caller has in flight at once


@pytest.fixture(scope="module")
def app(ray_local):
    from ray import serve

    from vlit.config import ServeConfig
    from vlit.serve.app import start

    tiny = {"kind": "hf", "model": {"preset": "tiny", "max_len": 2048}, "threads": 1}
    two = {"num_replicas": 2, "num_cpus": 0.25, "max_ongoing_requests": 32, "batch": {"max_batch_size": 8}}
    cfg = ServeConfig.model_validate({
        "app_name": APP,
        "http": {"host": "127.0.0.1", "port": free_port()},
        "request_timeout_s": 120,
        "generators": {"tiny": {"backend": tiny, "max_new_tokens": 16, "deployment": two}},
        "judges": {"tiny": {"backend": tiny, "mode": "logprob", "deployment": two}},
    })
    start(cfg)
    yield APP
    serve.shutdown()


def replicas(deployment: str) -> list[str]:
    """The names of a deployment's live replica actors (namespace "serve",
    `SERVE_REPLICA::<app>#<deployment>#<id>`)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


def replica_states(deployment: str) -> dict:
    from ray import serve

    return dict(serve.status().applications[APP].deployments[deployment].replica_states)


def wait_replaced(deployment: str, killed: str, timeout_s: float) -> float:
    """Seconds until the deployment has two running replicas again, `killed` not among them.
    (Right after a kill, serve.status() may still count the dead replica as running: the
    controller notices a death at its next health check.)"""
    started = time.monotonic()
    while not (replica_states(deployment) == {"RUNNING": 2} and len(names := replicas(deployment)) == 2
               and killed not in names):
        assert time.monotonic() - started < timeout_s, (replica_states(deployment), replicas(deployment))
        time.sleep(0.5)
    return time.monotonic() - started


class Killer(threading.Thread):
    """Kills the replica of `deployment` with the most ongoing requests, SETTLE_S after
    `results_seen` is set and once that replica holds at least MIN_ONGOING requests."""

    def __init__(self, deployment: str, rows: list, deadline_s: float = 240.0):
        super().__init__(daemon=True)
        self.deployment, self.rows, self.deadline_s = deployment, rows, deadline_s
        self.results_seen, self.stop = threading.Event(), threading.Event()
        self.killed: str | None = None
        self.ongoing_at_kill: dict[str, int] = {}
        self.killed_at: float | None = None
        self.rows_at_kill = 0
        self.error: BaseException | None = None

    def run(self):
        import ray

        try:
            started = time.monotonic()
            while not self.results_seen.wait(0.1):
                if self.stop.is_set():
                    return
            if self.stop.wait(SETTLE_S):
                return
            while not self.stop.is_set() and time.monotonic() - started < self.deadline_s:
                names = replicas(self.deployment)
                actors = {n: ray.get_actor(n, namespace="serve") for n in names}
                ongoing = dict(zip(names, ray.get([a.get_num_ongoing_requests.remote() for a in actors.values()],
                                                  timeout=30)))
                victim = max(ongoing, key=ongoing.get)
                if ongoing[victim] >= MIN_ONGOING:
                    ray.kill(actors[victim])
                    self.killed, self.ongoing_at_kill = victim, ongoing
                    self.killed_at, self.rows_at_kill = time.monotonic() - started, len(self.rows)
                    return
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def run_job_with_kill(method: str, requests: list[dict], deployment: str) -> dict:
    """`requests` through map_requests while Killer kills a replica of `deployment`; the
    output rows, the killer, and timings."""
    import ray.data

    from vlit.serve.client import map_requests

    before = replicas(deployment)
    assert len(before) == 2 and replica_states(deployment) == {"RUNNING": 2}
    items = [{"pid": f"p{i:04d}", "request": json.dumps(r)} for i, r in enumerate(requests)]
    rows: list[dict] = []
    killer = Killer(deployment, rows)
    started = time.monotonic()
    killer.start()
    try:
        # The arguments serve_calls passes; map_requests directly, to see each row's attempts.
        ds = map_requests(ray.data.from_items(items), method=method, app_name=APP, request_column="request",
                          batch_size=BLOCK, timeout_s=120.0)
        for row in ds.iter_rows():
            rows.append(row)
            killer.results_seen.set()
    finally:
        killer.stop.set()
        killer.join(60)
    job_s = time.monotonic() - started
    assert killer.error is None, repr(killer.error)
    assert killer.killed is not None, "the job ended before a replica held work to kill"
    assert killer.killed in before
    replaced_s = wait_replaced(deployment, killer.killed, timeout_s=180)
    after = replicas(deployment)
    attempts = Counter(r["attempts"] for r in rows)
    print(f"\n{deployment}: {len(rows)} rows in {job_s:.1f} s; killed at {killer.killed_at:.1f} s with "
          f"{killer.rows_at_kill} rows back, ongoing {sorted(killer.ongoing_at_kill.values())} "
          f"(victim {killer.ongoing_at_kill[killer.killed]}); attempts {dict(sorted(attempts.items()))}; "
          f"two running again {replaced_s:.1f} s after the job")
    return {"rows": rows, "items": items, "killer": killer, "before": before, "after": after, "job_s": job_s}


def check_no_row_lost_or_duplicated(out: dict) -> list[dict]:
    rows, items = out["rows"], out["items"]
    ids = Counter(r["pid"] for r in rows)
    assert set(ids) == {i["pid"] for i in items}, "lost prompt ids"
    assert [pid for pid, n in ids.items() if n > 1] == [], "duplicated prompt ids"
    failed = [(r["pid"], r["status"], r["attempts"], r["error"]) for r in rows if r["error"] or r["status"] != 200]
    assert failed == []
    by_pid = {i["pid"]: i["request"] for i in items}
    assert all(r["request"] == by_pid[r["pid"]] for r in rows)  # each input stays with its own result
    # The kill hit in-flight rows, and those were sent again.
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried, "no row needed a second attempt: the kill hit no in-flight work"
    # Only rows sent to the dead replica fail: those it held when killed, and at most one
    # block's worth sent in the moment before the caller's router learnt of the death.
    assert len(retried) <= out["killer"].ongoing_at_kill[out["killer"].killed] + BLOCK
    # Serve replaced the dead replica: two running, the killed one gone, a new one in its place.
    assert out["killer"].killed not in out["after"] and len(out["after"]) == 2
    assert len(set(out["after"]) - set(out["before"])) == 1
    return rows


@pytest.mark.timeout(600)
def test_generator_replica_killed_mid_job_loses_and_duplicates_no_row(app):
    # Enough rows that the job outlasts the killer's settle time on a quiet machine too
    # (240 finished before any replica held MIN_ONGOING requests on one CI run).
    n = 480
    requests = [{"model": "tiny", "max_tokens": 16, "temperature": 0.0,
                 "messages": [{"role": "user", "content": f"Prompt {i:04d}: describe a red square."}]}
                for i in range(n)]
    rows = check_no_row_lost_or_duplicated(run_job_with_kill("chat", requests, GENERATOR))
    for r in rows:
        result = json.loads(r["result"])
        assert result["object"] == "chat.completion" and result["model"] == "tiny" and result["choices"]


@pytest.mark.timeout(600)
def test_judge_replica_killed_mid_job_loses_and_duplicates_no_row(app):
    n = 320
    requests = [{"model": "tiny", "instruction": f"Prompt {i:04d}: what color is the square?",
                 "response": "The square is red."} for i in range(n)]
    rows = check_no_row_lost_or_duplicated(run_job_with_kill("judge", requests, JUDGE))
    for r in rows:
        result = json.loads(r["result"])
        assert result["model"] == "tiny" and result["mode"] == "logprob"
        assert all(s["status"] == "ok" for s in result["scores"].values())
