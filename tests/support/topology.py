"""A multi-node topology on one machine: a Ray head and worker nodes started with
`ray start`, each with its own temp dir, working folder and resources; S3 (moto's server)
on 127.0.0.1 as the only shared storage; an MLflow server on a PostgreSQL backend store
with its artifacts in S3. Used by tests/test_cluster_local.py and, for users, by
`make cluster-demo` (python tests/support/topology.py demo). Test tooling: moto is a dev
dependency, so none of this is imported by the runtime package.

Credentials reach the nodes and the MLflow server through their environment only; the
job's runtime env carries the working dir and nothing else.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (make cluster-demo): find `support`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.s3 import LocalS3, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
BUCKET = "vlit"
STORE = f"s3://{BUCKET}/store"
# Custom resource only worker nodes offer; train workers ask for one each
# (train.resources_per_worker), so training never lands on the head.
TRAIN = "train"


def wait_for(what: str, ready, timeout: float, alive=lambda: True, log: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or not alive():
            tail = Path(log).read_text(errors="replace")[-3000:] if log and os.path.exists(log) else ""
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s\n{tail}")
        time.sleep(1)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it, plus every process in its session: Ray's workers
    are children of the raylet, started in the node's `ray start --block` session."""
    parents, sessions = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(stat[1])
            sessions[int(entry)] = int(stat[3])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo += [c for c, pp in parents.items() if pp == p]
    return sorted(found | {p for p, s in sessions.items() if s == pid})


@dataclass
class Node:
    name: str
    temp: str  # Ray's temp dir (short: socket paths max out at ~107 bytes)
    cwd: str  # the node's working folder: nothing may appear here
    proc: subprocess.Popen | None = None
    log: str = ""

    def runs(self, title: str) -> bool:
        """Whether one of this node's processes is a Ray worker titled `title` (Ray sets
        the command line of an actor's process to `ray::<Class>...`)."""
        for pid in _tree(self.proc.pid) if self.proc else []:
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{title}".encode()):
                    return True
            except OSError:
                continue
        return False

    def kill(self, sig: int = signal.SIGKILL, wait: float = 30) -> list[int]:
        """Send `sig` to every process of this node (raylet, agents, workers), by pid."""
        pids = _tree(self.proc.pid) if self.proc else []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if self.proc:
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        return pids


@dataclass
class LocalTopology:
    """`with LocalTopology() as topo:` S3, PostgreSQL, MLflow, a Ray head and `workers`
    worker nodes, all on 127.0.0.1, all under one short temp folder; torn down on exit,
    even when a start fails half-way."""

    workers: int = 2
    worker_cpus: int = 3
    train_slots: int = 2  # per worker node: the whole train group fits on any one of them
    head_cpus: int = 2
    object_store_mb: int = 400
    env: dict = field(default_factory=dict)  # extra variables for every node and server
    root: str = ""
    nodes: list[Node] = field(default_factory=list)

    # ---- up

    def __enter__(self) -> "LocalTopology":
        self.root = tempfile.mkdtemp(prefix="vt-", dir="/tmp")
        os.chmod(self.root, 0o755)  # PostgreSQL runs as another user below it
        self._stack: list = []
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.s3 = LocalS3(buckets=(BUCKET,)).__enter__()
        self._stack.append(lambda: self.s3.__exit__(None, None, None))
        self.tracking_uri = self._mlflow(self._postgres())
        self.gcs, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        head = self._ray_node("head", ["--head", f"--port={self.gcs}", f"--dashboard-port={self.dashboard_port}",
                                       "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                                       f"--num-cpus={self.head_cpus}", '--resources={"vlit_head": 1}'])
        wait_for("the Ray head", lambda: self._ray_ok(["job", "list", "--address", self.dashboard]), 180,
                 lambda: head.proc.poll() is None, head.log)
        for i in range(self.workers):
            self._ray_node(f"w{i}", [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={self.worker_cpus}",
                                     f"--resources={json.dumps({TRAIN: self.train_slots, f'vlit_w{i}': 1})}"])
        wait_for(f"{self.workers} Ray worker nodes", lambda: self.alive_nodes() == 1 + self.workers, 180)

    def node_env(self) -> dict:
        """What every node and server runs with: the AWS variables of the S3 endpoint, the
        tracking server, Ray's token auth (`ray start` turns it on; the CLI must say so)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what a single-node run sets) makes `ray start`
        # refuse worker nodes; 1 allows them, and --node-ip-address keeps all on loopback.
        env.update(PATH=f"{BIN}:{env['PATH']}", RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
                   RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", **self.env)
        if getattr(self, "tracking_uri", None):
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        return env

    def client_env(self) -> dict:
        """The submitting side's environment: no AWS credentials, so none can travel with the job."""
        return {k: v for k, v in self.node_env().items() if not k.startswith("AWS_")}

    def _dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _postgres(self) -> str:
        """A PostgreSQL 15 cluster in <root>/pg, run as `nobody` when we are root (it refuses root)."""
        data, port = self._dir("pg"), free_port()
        as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if as_user:
            shutil.chown(data, "nobody")
        log = os.path.join(data, "log")
        db = os.path.join(data, "db")
        subprocess.run([*as_user, PG_BIN / "initdb", "-D", db, "-U", "postgres", "--auth=trust"], check=True,
                       capture_output=True, timeout=120)
        # Stop registered first: a start that times out may still have left a server running.
        self._stack.append(lambda: subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", db, "-m", "fast", "-w", "stop"],
                                                  capture_output=True, timeout=60))
        subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", db, "-o", f"-k {data} -h 127.0.0.1 -p {port}", "-l", log,
                        "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
        # +psycopg2: SQLAlchemy's default PostgreSQL driver is psycopg 3, not installed.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def _mlflow(self, backend: str) -> str:
        port = free_port()
        path = os.path.join(self._dir("logs"), "mlflow.log")
        log = open(path, "wb")
        proc = subprocess.Popen([BIN / "mlflow", "server", "--backend-store-uri", backend,
                                 "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=self._dir("cwd-mlflow"), env=self.node_env(), stdout=log, stderr=log,
                                start_new_session=True)
        mlflow = Node("mlflow", "", "", proc)
        self._stack.append(lambda: (mlflow.kill(signal.SIGTERM, wait=10), mlflow.kill()))
        uri = f"http://127.0.0.1:{port}"
        wait_for("the MLflow server", lambda: _answers(f"{uri}/health"), 120, lambda: proc.poll() is None, path)
        return uri

    def _ray_node(self, name: str, args: list[str]) -> Node:
        node = Node(name, tempfile.mkdtemp(prefix=f"vr{name}-", dir="/tmp"), self._dir(f"cwd-{name}"))
        # Free ports for each node's agents: the defaults (52365, ...) collide between
        # nodes on one machine, and a node whose agent cannot bind never registers.
        ports = [f"--{p}={free_port()}" for p in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "metrics-export-port", "runtime-env-agent-port")]
        if name == "head":
            ports.append(f"--ray-client-server-port={free_port()}")
        node.log = os.path.join(self._dir("logs"), f"ray-{name}.log")
        log = open(node.log, "wb")
        # --block: the node's processes live in this process's session, so `kill` finds
        # them all, and teardown stops this topology only (`ray stop` stops every Ray).
        node.proc = subprocess.Popen([BIN / "ray", "start", "--block", "--node-ip-address=127.0.0.1",
                                      f"--temp-dir={node.temp}", "--disable-usage-stats",
                                      f"--object-store-memory={self.object_store_mb * 2**20}", *ports, *args],
                                     cwd=node.cwd, env=self.node_env(), stdout=log, stderr=log,
                                     start_new_session=True)
        self.nodes.append(node)
        # SIGKILL at teardown, as `ray stop --force` does: nothing of a scratch node is kept.
        self._stack.append(lambda: (node.kill(), shutil.rmtree(node.temp, ignore_errors=True)))
        return node

    def _ray_ok(self, args: list[str]) -> bool:
        return subprocess.run([BIN / "ray", *args], env=self.client_env(), capture_output=True,
                              timeout=60).returncode == 0

    def list(self, what: str, *filters: str) -> list[dict]:
        """`ray list WHAT` (dead entries included unless filtered), [] while the head cannot say."""
        r = subprocess.run([BIN / "ray", "list", what, "--address", self.dashboard, "--format", "json", "--detail",
                            "--limit", "10000", *(a for f in filters for a in ("--filter", f))],
                           env=self.client_env(), capture_output=True, text=True, timeout=120)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else []
        except json.JSONDecodeError:  # a head still starting can answer 0 with no JSON (seen on CI)
            return []

    def alive_nodes(self) -> int:
        return len(self.list("nodes", "state=ALIVE"))

    def node_ids(self) -> dict[str, str]:
        """Node name (head, w0, ...) -> Ray node id; each node carries a `vlit_<name>` resource."""
        return {key[len("vlit_"):]: n["node_id"] for n in self.list("nodes")
                for key in n["resources_total"] if key.startswith("vlit_")}

    def actor_nodes(self, cls: str) -> list[str]:
        """Node names of every actor of class `cls` the cluster has run (dead ones included)."""
        names = {v: k for k, v in self.node_ids().items()}
        return [names.get(a["node_id"]) for a in self.list("actors", f"class_name={cls}")]

    # ---- the job

    def submit(self, *args: str, timeout: int = 900, cwd: Path = REPO,
               options: tuple = ()) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . [OPTIONS] -- python ARGS...`: the driver runs on
        the head, in its own copy of the working dir; output as the CLI prints it."""
        cmd = [BIN / "ray", "job", "submit", "--address", self.dashboard, "--working-dir", ".", *options, "--",
               "python", *args]
        deadline = time.monotonic() + timeout
        while True:  # the head answers before its node's job agent has registered
            r = subprocess.run(cmd, cwd=cwd, env=self.client_env(), capture_output=True, text=True,
                               timeout=max(60, deadline - time.monotonic()))
            if "No available agent to submit job" not in r.stderr or time.monotonic() > deadline:
                return r
            time.sleep(3)

    # ---- down

    def __exit__(self, *exc) -> None:
        while self._stack:
            try:
                self._stack.pop()()
            except Exception as e:  # keep tearing down the rest
                print(f"[topology] teardown: {e!r}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


# The demo at test size (tests/test_cluster_local.py, bench/cluster_bench.py): a few
# minutes on 2 cores. sft1 runs 8 steps, checkpointing every 2, so a node can be killed
# between its first checkpoint and its end.
TEST_SIZE = (
    "pipeline.stages=[sft1,align,sft2,dpo]",
    "corpus.synth.instances=240", "corpus.synth.tasks=8", "corpus.synth.image_pool=32",
    "train.max_steps=8", "train.checkpoint_every=2", "train.num_workers=2",
    "pipeline.overrides.sft2={train.max_steps: 2, train.materialize: true, train.micro_batch_size: 1}",
    "pipeline.overrides.dpo={train.max_steps: 2}",
    "loops.feedback.prompts=12", "loops.alignment.size=8",
    "eval.images=2", "eval.batch_size=8", "eval.gates={synthetic.mme.acc: 0.0}", "dpo.synth.prompts=8",
)


def job_args(jobs: str, *extra: str, store: str = STORE) -> list[str]:
    """jobs/two_stage.py on configs/demo.yaml with every store in S3 under `store` (the
    ledger at `jobs`) and train workers on worker nodes only; `extra` overrides last."""
    return ["jobs/two_stage.py", "--config", "configs/demo.yaml",
            f"corpus.out={store}/corpora", f"pipeline.out={jobs}", f"loops.out={store}/synth",
            f"eval.out={store}/evals", f"serve.images.uri_roots=[{store}]", f"dpo.pairs_out={store}/pairs",
            f"dpo.cache={store}/reference_cache", f"train.resources_per_worker={{CPU: 1, {TRAIN}: 1}}", *extra]


def demo() -> int:
    """`make cluster-demo`: the topology, the demo job submitted to it, then teardown."""
    with LocalTopology() as topo:
        print(f"Ray dashboard: {topo.dashboard}\nMLflow UI:     {topo.tracking_uri}\n"
              f"S3 endpoint:   {topo.s3.endpoint} (bucket {BUCKET})\nnodes' logs:   {topo.root}/logs", flush=True)
        r = topo.submit(*job_args(f"{STORE}/jobs", *sys.argv[2:]), options=("--no-wait",))
        job = next(iter(re.findall(r"raysubmit_[A-Za-z0-9]+", r.stdout)), None)  # the CLI colours it
        if r.returncode or not job:
            print(r.stdout, r.stderr, sep="\n")
            return r.returncode or 1
        # The job's output as it runs; then its status decides the exit code.
        subprocess.run([BIN / "ray", "job", "logs", "--follow", "--address", topo.dashboard, job],
                       env=topo.client_env())
        status = subprocess.run([BIN / "ray", "job", "status", "--address", topo.dashboard, job],
                                env=topo.client_env(), capture_output=True, text=True)
        print(status.stdout, status.stderr, flush=True)
        if sys.stdin.isatty():
            input("The topology stays up for a look (dashboard, MLflow UI); Enter tears it down. ")
        return 0 if "succeeded" in (status.stdout + status.stderr).lower() else 1


if __name__ == "__main__":
    sys.exit(demo() if sys.argv[1:2] == ["demo"] else print(__doc__) or 2)
