"""The manifest checker catches what the API server and KubeRay would reject, and what vlit
forbids: each test breaks one thing in a copy of a shipped manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from vlit.cli import main
from kubecheck import check_files, sync_serve_config
from kubecheck.check import load_documents

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def shipped(name: str, index: int = 0) -> dict:
    """A manifest of cluster/ as plain data: YAML aliases (&env, *env) no longer shared."""
    return json.loads(json.dumps(load_documents(CLUSTER / name)[index]))


def problems(tmp_path, crd_dir, *docs, root=None) -> list[str]:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return [str(p) for p in check_files([path], root=root, crd_dir=crd_dir).problems]


def only(found: list[str], *needles: str) -> str:
    """The one problem found, which must contain every needle."""
    assert len(found) == 1, found
    assert all(n in found[0] for n in needles), found[0]
    return found[0]


def head_container(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_shipped_copies_are_clean(tmp_path, crd_dir):
    docs = [shipped("raycluster.yaml"), shipped("rayjob.yaml"), shipped("rayservice.yaml"),
            *(shipped("mlflow.yaml", i) for i in range(4))]
    assert problems(tmp_path, crd_dir, *docs) == []


def test_misspelled_field_names_file_path_and_suggestion(tmp_path, crd_dir):
    job = shipped("rayjob.yaml")
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    found = problems(tmp_path, crd_dir, job)
    msg = [p for p in found if "unknown field" in p]
    assert msg == [f"{tmp_path / 'manifest.yaml'}: RayJob vlit-two-stage: spec.shutdownAfterJobFinish: "
                   "unknown field (did you mean 'shutdownAfterJobFinishes'?)"]
    # Without shutdownAfterJobFinishes, the ttl is refused by KubeRay's rule too.
    assert any("ttlSecondsAfterFinished" in p for p in found)

    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["imagePullPolicyy"] = "Always"
    only(problems(tmp_path, crd_dir, cluster),
         "spec.headGroupSpec.template.spec.containers[0].imagePullPolicyy: unknown field", "'imagePullPolicy'")


def test_wrong_types(tmp_path, crd_dir):
    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 8  # must be a string
    only(problems(tmp_path, crd_dir, cluster), "workerGroupSpecs[1].rayStartParams.num-gpus: expected string, got integer 8")

    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    only(problems(tmp_path, crd_dir, cluster), "workerGroupSpecs[0].maxReplicas: expected integer, got string")

    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 16.0  # JSON 16.0 is no integer here
    only(problems(tmp_path, crd_dir, cluster), "maxReplicas: expected integer, got number 16.0")

    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["resources"]["limits"]["cpu"] = 1.5  # quantities: int or string
    only(problems(tmp_path, crd_dir, cluster), 'limits.cpu: expected an integer or a string, got number 1.5')

    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**31  # format: int32
    only(problems(tmp_path, crd_dir, cluster), "maxReplicas: 2147483648 is greater than the maximum of 2147483647")


def test_defaults_enums_duplicates_and_status(tmp_path, crd_dir):
    cluster = shipped("raycluster.yaml")
    group = cluster["spec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # required, but defaulted by the API server
    assert problems(tmp_path, crd_dir, cluster) == []
    del group["groupName"]  # required, no default
    only(problems(tmp_path, crd_dir, cluster), "workerGroupSpecs[0].groupName: required field is missing")

    cluster = shipped("raycluster.yaml")
    cluster["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    only(problems(tmp_path, crd_dir, cluster), "upscalingMode: \"Fast\" is not one of")

    cluster = shipped("raycluster.yaml")
    env = head_container(cluster["spec"])["env"]
    env.append(dict(env[0]))  # a list-type map keyed by name
    only(problems(tmp_path, crd_dir, cluster), "env[4]: duplicate entry (name='AWS_ACCESS_KEY_ID'), also at [0]")

    cluster = shipped("raycluster.yaml")
    cluster["status"] = {"state": "ready"}
    only(problems(tmp_path, crd_dir, cluster), "status: status is written by the controller")

    cluster = shipped("raycluster.yaml")
    cluster["apiVersion"] = "ray.io/v1alpha1"
    only(problems(tmp_path, crd_dir, cluster), "apiVersion: expected 'ray.io/v1'")

    only(problems(tmp_path, crd_dir, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}),
         "'ConfigMap' is not a kind this checker knows")


def test_cel_rules_of_the_crds(tmp_path, crd_dir):
    job = shipped("rayjob.yaml")
    job["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    only(problems(tmp_path, crd_dir, job), "spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure")
    job["spec"]["deletionStrategy"]["onFailure"] = {"policy": "DeleteNone"}
    assert problems(tmp_path, crd_dir, job) == []

    cluster = shipped("raycluster.yaml")
    cluster["spec"]["managedBy"] = "someone-else"
    only(problems(tmp_path, crd_dir, cluster), "spec.managedBy: the managedBy field value must be either")


def test_controller_rules(tmp_path, crd_dir):
    job = shipped("rayjob.yaml")
    job["metadata"]["name"] = "j" * 48
    only(problems(tmp_path, crd_dir, job), "metadata.name: RayJob names are at most 47 characters")
    job["metadata"]["name"] = "j" * 47
    assert problems(tmp_path, crd_dir, job) == []
    job["metadata"]["name"] = "Two_Stage"
    only(problems(tmp_path, crd_dir, job), "is not a DNS-1035 label")

    cluster = shipped("raycluster.yaml")
    cluster["metadata"]["name"] = "c" * 54
    only(problems(tmp_path, crd_dir, cluster), "RayCluster names are at most 53 characters")

    job = shipped("rayjob.yaml")
    job["spec"]["clusterSelector"] = {"ray.io/cluster": "vlit"}
    only(problems(tmp_path, crd_dir, job), "set exactly one of rayClusterSpec and clusterSelector")
    del job["spec"]["rayClusterSpec"], job["spec"]["clusterSelector"]
    only(problems(tmp_path, crd_dir, job), "set exactly one of rayClusterSpec and clusterSelector (got neither)")

    job = shipped("rayjob.yaml")
    job["spec"]["suspend"] = True
    assert problems(tmp_path, crd_dir, job) == []
    job["spec"]["shutdownAfterJobFinishes"] = False
    found = problems(tmp_path, crd_dir, job)
    assert any("spec.suspend: suspend: true needs shutdownAfterJobFinishes: true" in p for p in found), found

    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][1]["groupName"] = "cpu"
    only(problems(tmp_path, crd_dir, cluster), "worker group name 'cpu' is used twice")
    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = 20
    only(problems(tmp_path, crd_dir, cluster), "minReplicas 20 > maxReplicas 16")
    cluster = shipped("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = "4"
    only(problems(tmp_path, crd_dir, cluster), "num-gpus 4 but the Ray container (containers[0]) has nvidia.com/gpu limit 8")


def test_credentials_only_through_secret_references(tmp_path, crd_dir):
    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["env"][1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}
    only(problems(tmp_path, crd_dir, cluster), "env[1].value: AWS_SECRET_ACCESS_KEY looks like a credential")

    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["env"][0]["valueFrom"] = {"configMapKeyRef": {"name": "c", "key": "k"}}
    only(problems(tmp_path, crd_dir, cluster), "env[0].valueFrom: AWS_ACCESS_KEY_ID looks like a credential")

    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["env"].append({"name": "DB", "value": "postgresql://u:hunter2@db:5432/x"})
    only(problems(tmp_path, crd_dir, cluster), "env[4].value: contains a URL with a password")

    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["env"].append({"name": "TOKENIZERS_PARALLELISM", "value": "false"})
    assert problems(tmp_path, crd_dir, cluster) == []  # not a credential, though it says TOKEN

    job = shipped("rayjob.yaml")
    job["spec"]["runtimeEnvYAML"] += "  AWS_SECRET_ACCESS_KEY: abc\n"
    only(problems(tmp_path, crd_dir, job), "runtimeEnvYAML.env_vars.AWS_SECRET_ACCESS_KEY: a credential in a runtime environment")
    job = shipped("rayjob.yaml")
    job["spec"]["runtimeEnvYAML"] = "env_vars: [unclosed"
    only(problems(tmp_path, crd_dir, job), "spec.runtimeEnvYAML: not valid YAML")

    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vlit-s3"},
              "stringData": {"secret-access-key": "abc"}}
    only(problems(tmp_path, crd_dir, secret), "stringData: a Secret manifest with values commits a credential")
    del secret["stringData"]
    assert problems(tmp_path, crd_dir, secret) == []


def test_containers_run_as_non_root(tmp_path, crd_dir):
    cluster = shipped("raycluster.yaml")
    pod = cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]
    pod["securityContext"] = {"runAsNonRoot": True}
    only(problems(tmp_path, crd_dir, cluster), "workerGroupSpecs[1].template.spec.containers[0].securityContext.runAsUser: set a non-zero runAsUser")
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": 0}
    only(problems(tmp_path, crd_dir, cluster), "runAsUser: runAsUser 0 is root")
    pod["securityContext"] = {"runAsUser": 1000}
    only(problems(tmp_path, crd_dir, cluster), "runAsNonRoot: containers run as non-root")

    deployment = shipped("mlflow.yaml", 2)
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    found = problems(tmp_path, crd_dir, deployment)
    assert len(found) == 2 and found[0].endswith("securityContext.privileged: privileged containers are not allowed")
    assert found[1].endswith("securityContext.allowPrivilegeEscalation: set allowPrivilegeEscalation: false")

    cluster = shipped("raycluster.yaml")
    del cluster["spec"]["autoscalerOptions"]["securityContext"]
    only(problems(tmp_path, crd_dir, cluster), "autoscalerOptions.securityContext.allowPrivilegeEscalation")


def test_core_kinds_against_embedded_kubernetes_schemas(tmp_path, crd_dir):
    postgres, deployment, service = shipped("mlflow.yaml", 0), shipped("mlflow.yaml", 2), shipped("mlflow.yaml", 3)
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    only(problems(tmp_path, crd_dir, deployment), "containers[0].livenesProbe: unknown field (did you mean 'livenessProbe'?)")

    deployment = shipped("mlflow.yaml", 2)
    deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"
    only(problems(tmp_path, crd_dir, deployment), "selector does not match the pod template's labels")

    service["spec"]["ports"][0]["port"] = "5000"
    only(problems(tmp_path, crd_dir, service), "spec.ports[0].port: expected integer, got string")
    service = shipped("mlflow.yaml", 3)
    service["metadata"]["name"] = "Vlit.MLflow"
    only(problems(tmp_path, crd_dir, service), "Service names are DNS-1035 labels")

    postgres["spec"]["volumeClaimTemplates"][0]["spec"]["accessMode"] = ["ReadWriteOnce"]
    only(problems(tmp_path, crd_dir, postgres), "volumeClaimTemplates[0].spec.accessMode: unknown field")


def test_yaml_duplicate_keys_and_unknown_crds(tmp_path, crd_dir):
    text = (CLUSTER / "raycluster.yaml").read_text().replace("  rayVersion: \"2.60.0\"\n", "  rayVersion: \"2.60.0\"\n  rayVersion: \"2.9.0\"\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    (found,) = check_files([path], crd_dir=crd_dir).problems
    assert "key 'rayVersion' appears twice" in str(found)

    other = tmp_path / "crds"
    shutil.copytree(crd_dir, other)
    with open(other / "ray.io_rayclusters.yaml", "a") as f:
        f.write("# changed\n")
    found = check_files([CLUSTER / "raycluster.yaml"], crd_dir=str(other)).problems
    assert len(found) == 1 and "is not the KubeRay v1.7.0 CRD this checker knows" in str(found[0])


def test_serve_config_drift_is_caught_and_synced(tmp_path, crd_dir):
    path = tmp_path / "rayservice.yaml"
    text = (CLUSTER / "rayservice.yaml").read_text()
    path.write_text(text.replace("max_new_tokens: 512", "max_new_tokens: 256", 1))
    (found,) = check_files([path], root=REPO, crd_dir=crd_dir).problems
    assert "spec.serveConfigV2.applications[0].args.generators.llava-7b.max_new_tokens: differs from " \
           "configs/serve/vlfeedback.yaml: 256 here, 512 there" in str(found)
    assert sync_serve_config(path, REPO) == ["vlit-serve"]
    assert path.read_text() == text  # comments and layout kept; only the block rewritten
    assert check_files([path], root=REPO, crd_dir=crd_dir).ok


def test_job_config_is_checked_against_its_cluster(tmp_path, crd_dir):
    def with_args(*args):
        job = shipped("rayjob.yaml")
        job["spec"]["entrypoint"] += " " + " ".join(args)
        return problems(tmp_path, crd_dir, job, root=REPO)

    assert with_args() == []
    only(with_args("ray.address=null"), "ray.address is not set, so the job would start its own Ray")
    only(with_args("train.num_workers=40"), "train.num_workers 40 GPU workers, but the cluster scales to 32 GPUs")
    only(with_args("corpus.out=/data/corpora"), "corpus.out is a local path")
    only(with_args("train.zero_stagee=3"), "train.zero_stagee: Extra inputs are not permitted")


def test_cli(tmp_path, crd_dir, capsys):
    assert main(["cluster", "check", "--root", str(REPO), "--crds", crd_dir]) == 0
    out = capsys.readouterr().out
    assert "7 manifests in 4 files: ok" in out and "needs Secret vlit-s3: access-key-id" in out

    cluster = shipped("raycluster.yaml")
    head_container(cluster["spec"])["imagePullPolicyy"] = "Always"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cluster))
    assert main(["cluster", "check", str(bad), "--crds", crd_dir]) == 1
    captured = capsys.readouterr()
    assert f"{bad}: RayCluster vlit: spec.headGroupSpec.template.spec.containers[0].imagePullPolicyy: unknown field" in captured.out
    assert "1 problem(s) in 1 manifests" in captured.err
