"""The shipped manifests: valid (KubeRay v1.7.0 CRDs, strictly, plus the controller's and
vlit's rules), consistent with each other and with the configs and jobs they run."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from vlit.config import load_config
from kubecheck import check_files
from kubecheck.check import load_documents
from kubecheck.rules import containers, pod_specs
from vlit.serve.app import deploy_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def docs() -> dict[str, dict]:
    """kind/name -> manifest, over all files."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for path in MANIFESTS for d in load_documents(path)}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path, crd_dir):
    report = check_files([path], root=REPO, crd_dir=crd_dir)
    assert report.ok, "\n".join(map(str, report.problems))


def test_the_issue_s_objects_are_there():
    assert set(docs()) == {"RayCluster/vlit", "RayJob/vlit-two-stage", "RayService/vlit-serve",
                           "Deployment/vlit-mlflow", "Service/vlit-mlflow",
                           "StatefulSet/vlit-mlflow-postgres", "Service/vlit-mlflow-postgres"}


def test_raycluster_groups_and_autoscaling():
    spec = docs()["RayCluster/vlit"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    cpu, gpu = spec["workerGroupSpecs"]
    assert (cpu["groupName"], gpu["groupName"]) == ("cpu", "gpu")
    for group in (cpu, gpu):
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == int(gpu["rayStartParams"]["num-gpus"]) == 8
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_rayjob_runs_the_two_stage_job_on_the_same_cluster():
    everything = docs()
    job = everything["RayJob/vlit-two-stage"]["spec"]
    assert job["rayClusterSpec"] == everything["RayCluster/vlit"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "jobs/two_stage.py", "--config"] and (REPO / argv[3]).exists()
    cfg = load_config(str(REPO / argv[3]), argv[4:])
    assert cfg.ray.address == "auto" and cfg.corpus.out.startswith("s3://")
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 1

    # MLFLOW_TRACKING_URI names the MLflow Service and its port.
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    uri = urlparse(env["MLFLOW_TRACKING_URI"])
    service = everything[f"Service/{uri.hostname}"]
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    deployment = everything["Deployment/vlit-mlflow"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_rayservice_serves_the_local_serve_config():
    """serveConfigV2 is exactly Ray Serve's config of the file `jobs/serve.py` runs."""
    service = docs()["RayService/vlit-serve"]
    ref = service["metadata"]["annotations"]["vlit/serve-config"]
    assert ref == "configs/serve/vlfeedback.yaml"
    expected = deploy_config(load_config(str(REPO / ref)))
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == expected
    app = expected["applications"][0]
    assert app["import_path"] == "vlit.serve.app:app_builder" and app["args"]["generators"] and app["args"]["judges"]


def test_mlflow_server_postgres_and_s3():
    everything = docs()
    mlflow = everything["Deployment/vlit-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) for a in mlflow["args"] if "=" in a)
    assert args["--default-artifact-root"].startswith("s3://")
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "vlit-mlflow-db", "key": "uri"}
    port = {p["name"]: p["containerPort"] for p in mlflow["ports"]}["http"]
    assert port == int(args["--port"]) == 5000
    postgres = everything["StatefulSet/vlit-mlflow-postgres"]["spec"]["template"]["spec"]["containers"][0]
    assert postgres["image"].startswith("postgres:")
    assert {e["name"]: e for e in postgres["env"]}["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "vlit-mlflow-db"


def test_images_are_this_version():
    """One registry path (the README's `sed` sets it) for the three images of cluster/Dockerfile."""
    images = {c["image"] for d in docs().values() for at, pod in pod_specs(d) for _, c in containers(pod)}
    ours = images - {"postgres:17.6"}
    (registry,) = {i.rsplit("/", 1)[0] for i in ours}
    assert ours == {f"{registry}/vlit:{VERSION}", f"{registry}/vlit:{VERSION}-vllm", f"{registry}/mlflow:{VERSION}"}


def test_every_ray_pod_works_in_the_image_s_copy_of_the_repository():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    workdir = dockerfile.split("FROM rayproject/ray", 1)[1].split("WORKDIR ", 1)[1].split()[0]  # vlit-base
    for name in ("RayCluster/vlit", "RayJob/vlit-two-stage", "RayService/vlit-serve"):
        doc = docs()[name]
        for at, pod in pod_specs(doc):
            if "submitterPodTemplate" not in at:
                assert pod["containers"][0]["workingDir"] == workdir, (name, at)


def test_readme_creates_every_secret_the_manifests_need(crd_dir):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on Kubernetes", 1)[1].split("\n## ", 1)[0]
    created: dict[str, set[str]] = {}
    for command in section.replace("\\\n", " ").splitlines():
        if "create secret generic" in command:
            name = command.split("create secret generic", 1)[1].split()[0]
            created[name] = set(re.findall(r"--from-literal=([\w.-]+)=", command))
    needed = check_files(MANIFESTS, crd_dir=crd_dir).secrets
    for name, keys in needed.items():
        assert name in created, f"the README does not create Secret {name}"
        assert {k for k, required in keys.items() if required} <= created[name], name
