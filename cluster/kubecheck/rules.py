"""Rules beyond the schemas: what the API server and KubeRay's controller reject, and vlit's
own rules for every manifest.

Each rule takes one parsed manifest and yields `(path, message)`, `path` a tuple of keys
and list indexes. Rules read defensively: a manifest that also fails its schema still gets
every rule that can run on it.

API server and KubeRay controller (v1.7):
- object names: RayJob and RayService at most 47 characters, RayCluster at most 53, all
  three DNS-1035 labels; Services DNS-1035 labels; other kinds DNS-1123 subdomains;
  label keys and values, container names and port names in their Kubernetes syntax;
- RayJob: exactly one of `rayClusterSpec` and `clusterSelector`; `suspend: true` needs
  `shutdownAfterJobFinishes: true`, and so does a `ttlSecondsAfterFinished`;
- Ray clusters: a head container and a container in every worker group, unique worker
  group names, `minReplicas <= maxReplicas`;
- Deployments and StatefulSets: the selector matches the pod template's labels.

vlit (every manifest, KubeRay or not):
- credentials only through Secret references: an env var with a credential-like name
  comes from `valueFrom.secretKeyRef`; no URL with a password, access key or private key
  in any string; no credential-like variable in a RayJob's `runtimeEnvYAML` or a
  RayService's Serve config (neither can reference a Secret); a Secret manifest carries
  no data (secrets are created with kubectl, never committed);
- containers run as non-root: `runAsNonRoot: true` and a non-zero `runAsUser` (pod or
  container), no privilege escalation, not privileged; the autoscaler sidecar too;
- images are pinned by tag or digest (not `latest`); a worker group's `replicas` lies
  within its bounds (the autoscaler would move it there at once);
- `rayStartParams.num-gpus` agrees with the Ray container's `nvidia.com/gpu` limit;
- the RayJob has an entrypoint, its `runtimeEnvYAML` and the RayService's `serveConfigV2`
  parse as YAML mappings (Serve's needs `applications`).
"""
from __future__ import annotations

import re
from typing import Iterator

import yaml

At = tuple  # a field path: keys and list indexes
Found = Iterator[tuple[At, str]]

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
NAME_LIMITS = {"RayJob": 47, "RayService": 47, "RayCluster": 53}

# Variable-name words that mark a credential (AWS_ACCESS_KEY_ID, OPENAI_API_KEY, HF_TOKEN, ...).
_SECRET_WORDS = {"PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
_KEY_QUALIFIERS = {"API", "ACCESS", "PRIVATE", "SECRET", "SIGNING", "ENCRYPTION", "SESSION"}
_SECRET_VALUES = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"), "a URL with a password"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an API key"),
]


def is_credential_name(name: str) -> bool:
    words = re.split(r"[^A-Za-z0-9]+", name.upper())
    if _SECRET_WORDS & set(words):
        return True
    return any(w == "KEY" and i and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words))


def dig(d, *keys, default=None):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and 0 <= k < len(d):
            d = d[k]
        else:
            return default
    return d


def mappings(items) -> Iterator[tuple[int, dict]]:
    return ((i, x) for i, x in enumerate(items if isinstance(items, list) else []) if isinstance(x, dict))


# ---- where things are ------------------------------------------------------------------

def cluster_specs(doc: dict) -> Iterator[tuple[At, dict]]:
    """The Ray cluster specs in a KubeRay manifest."""
    kind, spec = doc.get("kind"), doc.get("spec")
    where = {"RayCluster": (), "RayJob": ("rayClusterSpec",), "RayService": ("rayClusterConfig",)}.get(kind)
    cluster = dig(spec, *where) if where is not None else None
    if isinstance(cluster, dict):
        yield ("spec", *where), cluster


def ray_groups(cluster: dict) -> Iterator[tuple[At, dict]]:
    """(path, group) for the head and each worker group of a cluster spec."""
    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        yield ("headGroupSpec",), head
    for i, group in mappings(cluster.get("workerGroupSpecs")):
        yield ("workerGroupSpecs", i), group


def pod_specs(doc: dict) -> Iterator[tuple[At, dict]]:
    """(path, pod spec) for every pod template of a manifest."""
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet"):
        spec = dig(doc, "spec", "template", "spec")
        if isinstance(spec, dict):
            yield ("spec", "template", "spec"), spec
    for at, cluster in cluster_specs(doc):
        for group_at, group in ray_groups(cluster):
            spec = dig(group, "template", "spec")
            if isinstance(spec, dict):
                yield (*at, *group_at, "template", "spec"), spec
    submitter = dig(doc, "spec", "submitterPodTemplate", "spec") if kind == "RayJob" else None
    if isinstance(submitter, dict):
        yield ("spec", "submitterPodTemplate", "spec"), submitter


def containers(pod: dict) -> Iterator[tuple[At, dict]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in mappings(pod.get(field)):
            yield (field, i), c


# ---- API server and KubeRay controller ---------------------------------------------------

def _label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return "prefix must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return "name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _meta_rules(meta, at: At) -> Found:
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items() if isinstance(meta, dict) else ():
            if isinstance(key, str) and (why := _label_key_problem(key)):
                yield (*at, field, key), f"invalid key: {why}"
            if field == "labels" and isinstance(value, str) and value and (
                    len(value) > 63 or not _LABEL_NAME.match(value)):
                yield (*at, field, key), f"invalid label value {value!r}: at most 63 alphanumerics, '-', '_' or '.'"


def name_rules(doc: dict) -> Found:
    kind, name = doc.get("kind"), dig(doc, "metadata", "name")
    if not isinstance(name, str):
        return
    at = ("metadata", "name")
    if kind in NAME_LIMITS:
        if len(name) > NAME_LIMITS[kind]:
            yield at, f"{kind} names are at most {NAME_LIMITS[kind]} characters (KubeRay derives names from it); {name!r} has {len(name)}"
        if not _DNS1035.match(name):
            yield at, f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter)"
    elif kind == "Service":
        if len(name) > 63 or not _DNS1035.match(name):
            yield at, f"{name!r}: Service names are DNS-1035 labels (at most 63 lowercase letters, digits, '-', starting with a letter)"
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        yield at, f"{name!r} is not a DNS-1123 subdomain"
    yield from _meta_rules(doc.get("metadata"), ("metadata",))
    for pod_at, pod in pod_specs(doc):
        yield from _meta_rules(dig(doc, *pod_at[:-1], "metadata"), (*pod_at[:-1], "metadata"))
        seen = set()
        for c_at, c in containers(pod):
            cname = c.get("name")
            if isinstance(cname, str):
                if len(cname) > 63 or not _DNS1123_LABEL.match(cname):
                    yield (*pod_at, *c_at, "name"), f"container name {cname!r} is not a DNS-1123 label"
                if cname in seen:
                    yield (*pod_at, *c_at, "name"), f"container name {cname!r} is used twice in this pod"
                seen.add(cname)
            for p_i, port in mappings(c.get("ports")):
                pname = port.get("name")
                if isinstance(pname, str) and (len(pname) > 15 or not _PORT_NAME.match(pname)
                                               or not re.search("[a-z]", pname)):
                    yield (*pod_at, *c_at, "ports", p_i, "name"), f"port name {pname!r}: at most 15 lowercase alphanumerics or '-', with a letter"


def rayjob_rules(doc: dict) -> Found:
    if doc.get("kind") != "RayJob" or not isinstance(doc.get("spec"), dict):
        return
    spec = doc["spec"]
    given = [k for k in ("rayClusterSpec", "clusterSelector") if spec.get(k)]
    if len(given) != 1:
        yield ("spec",), f"set exactly one of rayClusterSpec and clusterSelector (got {given or 'neither'})"
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    if spec.get("suspend") is True and not shutdown:
        yield ("spec", "suspend"), "suspend: true needs shutdownAfterJobFinishes: true"
    if (spec.get("ttlSecondsAfterFinished") or 0) > 0 and not shutdown:
        yield ("spec", "ttlSecondsAfterFinished"), "a ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"
    if spec.get("submissionMode", "K8sJobMode") != "InteractiveMode" and not str(spec.get("entrypoint") or "").strip():
        yield ("spec", "entrypoint"), "the job has no entrypoint"
    if "runtimeEnvYAML" in spec:
        env = _yaml_mapping(spec["runtimeEnvYAML"])
        if isinstance(env, str):
            yield ("spec", "runtimeEnvYAML"), env
        else:
            yield from _runtime_env_rules(env, ("spec", "runtimeEnvYAML"))


def rayservice_rules(doc: dict) -> Found:
    if doc.get("kind") != "RayService" or not isinstance(doc.get("spec"), dict):
        return
    at = ("spec", "serveConfigV2")
    if "serveConfigV2" not in doc["spec"]:
        return
    serve = _yaml_mapping(doc["spec"]["serveConfigV2"])
    if isinstance(serve, str):
        yield at, serve
        return
    apps = serve.get("applications")
    if not isinstance(apps, list) or not apps:
        yield at, "Serve's config needs a non-empty `applications` list"
        return
    for i, app in mappings(apps):
        if not app.get("import_path"):
            yield (*at, "applications", i), "an application without import_path"
        yield from _runtime_env_rules(app.get("runtime_env") or {}, (*at, "applications", i, "runtime_env"))


def _yaml_mapping(text) -> dict | str:
    """The parsed mapping, or a message saying why it is not one."""
    try:
        value = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as e:
        return f"not valid YAML: {str(e).splitlines()[0]}"
    return value if isinstance(value, dict) else "must be a YAML mapping"


def _runtime_env_rules(env: dict, at: At) -> Found:
    for name in (env.get("env_vars") or {}) if isinstance(env, dict) else ():
        if is_credential_name(str(name)):
            yield (*at, "env_vars", name), ("a credential in a runtime environment is stored in plain text; put it in "
                                           "the pods' env from a Secret (valueFrom.secretKeyRef)")


def cluster_rules(doc: dict) -> Found:
    for at, cluster in cluster_specs(doc):
        if not dig(cluster, "headGroupSpec", "template", "spec", "containers"):
            yield (*at, "headGroupSpec", "template", "spec", "containers"), "the head needs a container"
        names = set()
        for i, group in mappings(cluster.get("workerGroupSpecs")):
            g_at = (*at, "workerGroupSpecs", i)
            if not dig(group, "template", "spec", "containers"):
                yield (*g_at, "template", "spec", "containers"), "a worker group needs a container"
            name = group.get("groupName")
            if name in names:
                yield (*g_at, "groupName"), f"worker group name {name!r} is used twice"
            names.add(name)
            lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1), group.get("replicas")
            if all(isinstance(v, int) for v in (lo, hi)) and lo > hi:
                yield (*g_at, "minReplicas"), f"minReplicas {lo} > maxReplicas {hi}"
            elif isinstance(n, int) and isinstance(lo, int) and isinstance(hi, int) and not lo <= n <= hi:
                yield (*g_at, "replicas"), f"replicas {n} is outside [minReplicas {lo}, maxReplicas {hi}]"
        for g_at, group in ray_groups(cluster):
            yield from _gpu_rule(group, (*at, *g_at))
        redis = dig(cluster, "gcsFaultToleranceOptions", "redisPassword", "value")
        if redis:
            yield (*at, "gcsFaultToleranceOptions", "redisPassword", "value"), "inline password: use valueFrom.secretKeyRef"


def _gpu_rule(group: dict, at: At) -> Found:
    params = group.get("rayStartParams") if isinstance(group.get("rayStartParams"), dict) else {}
    limits = dig(group, "template", "spec", "containers", 0, "resources", "limits") or {}
    gpus, limit = params.get("num-gpus"), limits.get("nvidia.com/gpu") if isinstance(limits, dict) else None
    if gpus is None:
        return
    try:
        gpus, limit = float(gpus), float(limit) if limit is not None else 0.0
    except (TypeError, ValueError):
        yield (*at, "rayStartParams", "num-gpus"), f"not a number: {gpus!r}"
        return
    if gpus != limit:
        yield (*at, "rayStartParams", "num-gpus"), (
            f"num-gpus {gpus:g} but the Ray container (containers[0]) has nvidia.com/gpu limit {limit:g}")


def workload_rules(doc: dict) -> Found:
    if doc.get("kind") not in ("Deployment", "StatefulSet"):
        return
    wanted = dig(doc, "spec", "selector", "matchLabels") or {}
    labels = dig(doc, "spec", "template", "metadata", "labels") or {}
    if isinstance(wanted, dict) and isinstance(labels, dict):
        for key, value in wanted.items():
            if labels.get(key) != value:
                yield ("spec", "selector", "matchLabels", key), "selector does not match the pod template's labels"


# ---- vlit: credentials, non-root, images -------------------------------------------------

def credential_rules(doc: dict) -> Found:
    for pod_at, pod in pod_specs(doc):
        for c_at, c in containers(pod):
            for i, env in mappings(c.get("env")):
                name, at = str(env.get("name", "")), (*pod_at, *c_at, "env", i)
                if not is_credential_name(name):
                    continue
                if "value" in env:
                    yield (*at, "value"), f"{name} looks like a credential: take it from a Secret (valueFrom.secretKeyRef), never inline"
                elif isinstance(env.get("valueFrom"), dict) and "secretKeyRef" not in env["valueFrom"]:
                    yield (*at, "valueFrom"), f"{name} looks like a credential: take it from a Secret (secretKeyRef)"
    if doc.get("kind") == "Secret":
        for field in ("data", "stringData"):
            if doc.get(field):
                yield (field,), ("a Secret manifest with values commits a credential; create the Secret with "
                                 "`kubectl create secret` and reference it")
    yield from _scan_strings(doc, ())


def _scan_strings(node, at: At) -> Found:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _scan_strings(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _scan_strings(v, (*at, i))
    elif isinstance(node, str):
        for pattern, what in _SECRET_VALUES:
            if pattern.search(node):
                yield at, f"contains {what}: credentials go in Secrets, referenced by secretKeyRef"


def security_rules(doc: dict) -> Found:
    for pod_at, pod in pod_specs(doc):
        pod_sc = pod.get("securityContext") if isinstance(pod.get("securityContext"), dict) else {}
        for c_at, c in containers(pod):
            sc = c.get("securityContext") if isinstance(c.get("securityContext"), dict) else {}
            at = (*pod_at, *c_at)
            nonroot = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if nonroot is not True:
                yield (*at, "securityContext", "runAsNonRoot"), "containers run as non-root: set runAsNonRoot: true (pod or container)"
            if user is None:
                yield (*at, "securityContext", "runAsUser"), ("set a non-zero runAsUser (pod or container): the kubelet cannot "
                                                              "check runAsNonRoot against an image whose USER is a name")
            elif user == 0:
                yield (*at, "securityContext", "runAsUser"), "runAsUser 0 is root"
            if sc.get("privileged") is True:
                yield (*at, "securityContext", "privileged"), "privileged containers are not allowed"
            if sc.get("allowPrivilegeEscalation") is not False:
                yield (*at, "securityContext", "allowPrivilegeEscalation"), "set allowPrivilegeEscalation: false"
            image = c.get("image")
            if isinstance(image, str) and "@" not in image and (
                    ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
                yield (*at, "image"), f"pin the image by tag or digest (not latest): {image!r}"
    for at, cluster in cluster_specs(doc):
        if cluster.get("enableInTreeAutoscaling") is True:
            sc = dig(cluster, "autoscalerOptions", "securityContext") or {}
            if not isinstance(sc, dict) or sc.get("allowPrivilegeEscalation") is not False:
                yield (*at, "autoscalerOptions", "securityContext", "allowPrivilegeEscalation"), (
                    "the autoscaler sidecar runs in the head pod: set allowPrivilegeEscalation: false")
            elif sc.get("runAsNonRoot") is False or sc.get("runAsUser") == 0:
                yield (*at, "autoscalerOptions", "securityContext"), "the autoscaler sidecar must not run as root"


RULES = (name_rules, rayjob_rules, rayservice_rules, cluster_rules, workload_rules, credential_rules, security_rules)


def apply_rules(doc: dict) -> Found:
    for rule in RULES:
        yield from rule(doc)
