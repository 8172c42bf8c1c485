"""JSON schemas for strict offline validation of Kubernetes manifests.

KubeRay kinds: `spec.versions[name == "v1"].schema.openAPIV3Schema` of the KubeRay v1.7.0
CRDs (../shared/kuberay-crds, or `VLIT_KUBERAY_CRDS`), turned into JSON Schema with the API
server's own reading of a structural schema, which a plain JSON-schema check misses:

- an object without `x-kubernetes-preserve-unknown-fields` is closed: an unknown field is
  an error (kubectl's default field validation is Strict);
- a `required` field that has a `default` may be omitted (the server fills it in);
- `x-kubernetes-int-or-string` takes an integer or a string; `nullable` admits null;
  `format: int32/int64` bound the integer; an integer field refuses 1.0;
- `x-kubernetes-list-type: map` (and `set`) lists refuse duplicate keys (items);
- `x-kubernetes-validations` (CEL) rules are evaluated for the rule forms these CRDs use;
  any other form is reported, never skipped silently. Transition rules (`oldSelf`) only
  apply to updates and are skipped;
- `metadata` is ObjectMeta (name, namespace, labels, annotations), `status` belongs to
  the controller.

Core kinds (Deployment, StatefulSet, Service, Secret): their pod templates, Services,
label selectors and volume claim templates are validated against the Kubernetes schemas
the RayCluster CRD embeds (core/v1 PodTemplateSpec, ServiceSpec, ...); the few workload
fields around them are spelled out here.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import yaml

# cluster/kubecheck/schemas.py -> the repository; its parent holds shared/.
_REPO = Path(__file__).resolve().parents[2]
CRD_DIR = Path(os.environ.get("VLIT_KUBERAY_CRDS", _REPO.parent / "shared" / "kuberay-crds"))
KUBERAY_VERSION = "v1.7.0"
# The published files (ray-project/kuberay, ray-operator/config/crd/bases/ at v1.7.0).
CRDS = {
    "RayJob": ("ray.io_rayjobs.yaml", "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"),
    "RayCluster": ("ray.io_rayclusters.yaml", "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"),
    "RayService": ("ray.io_rayservices.yaml", "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"),
}
CORE_KINDS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "Service": "v1", "Secret": "v1"}

_INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_COPIED = ("enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
           "exclusiveMinimum", "exclusiveMaximum", "uniqueItems", "multipleOf", "minProperties", "maxProperties")

OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


class SchemaError(RuntimeError):
    """The CRDs are missing or are not the KubeRay version this checker knows."""


def to_json_schema(node: dict) -> dict:
    """One OpenAPI v3 structural-schema node (a CRD's) as a JSON Schema node."""
    if not isinstance(node, dict):
        return node
    out: dict = {}
    nullable = node.get("nullable", False)
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}] + ([{"type": "null"}] if nullable else [])
    elif "type" in node:
        out["type"] = [node["type"], "null"] if nullable else node["type"]
    for key in _COPIED:
        if key in node:
            out[key] = list(node[key]) + [None] if key == "enum" and nullable else node[key]
    if node.get("format") in _INT_BOUNDS:
        lo, hi = _INT_BOUNDS[node["format"]]
        out["minimum"], out["maximum"] = max(lo, node.get("minimum", lo)), min(hi, node.get("maximum", hi))
    props = node.get("properties")
    if props is not None:
        out["properties"] = {k: to_json_schema(v) for k, v in props.items()}
    if "required" in node:
        # The API server defaults a missing field before it validates `required`.
        required = [r for r in node["required"] if "default" not in (props or {}).get(r, {})]
        if required:
            out["required"] = required
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node and key not in out:
            out[key] = [to_json_schema(n) for n in node[key]]
    if node.get("x-kubernetes-list-type") in ("map", "set"):
        out["x-list-type"] = node["x-kubernetes-list-type"]
        out["x-list-map-keys"] = node.get("x-kubernetes-list-map-keys", [])
        defaults = (node.get("items") or {}).get("properties", {})
        out["x-list-key-defaults"] = {k: defaults[k]["default"] for k in out["x-list-map-keys"]
                                      if "default" in defaults.get(k, {})}
    if node.get("x-kubernetes-validations"):
        out["x-cel"] = node["x-kubernetes-validations"]
    return out


def _load_yaml(path: Path):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~1 s per CRD instead of ~10
    with open(path, "rb") as f:
        return yaml.load(f, Loader=loader)


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, crd_dir: str | None = None) -> dict:
    """The v1 openAPIV3Schema of a KubeRay kind, as loaded (not transformed)."""
    name, sha256 = CRDS[kind]
    path = Path(crd_dir or CRD_DIR) / name
    if not path.exists():
        raise SchemaError(f"{path} not found: the KubeRay {KUBERAY_VERSION} CRDs are expected in "
                          f"{path.parent} (set VLIT_KUBERAY_CRDS or --crds)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SchemaError(f"{path} is not the KubeRay {KUBERAY_VERSION} CRD this checker knows "
                          f"(sha256 {digest[:12]}..., expected {sha256[:12]}...)")
    crd = _load_yaml(path)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _root(api_version: str, kind: str, spec: dict, required_spec: bool = True, extra: dict | None = None) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata"] + (["spec"] if required_spec else []),
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": OBJECT_META,
            "spec": spec,
            **(extra or {}),
        },
    }


@functools.lru_cache(maxsize=None)
def schema_for(kind: str, crd_dir: str | None = None) -> dict:
    """The JSON Schema a manifest of `kind` must satisfy (KubeRay kinds and CORE_KINDS)."""
    if kind in CRDS:
        spec = to_json_schema(crd_schema(kind, crd_dir)["properties"]["spec"])
        return _root("ray.io/v1", kind, spec)
    return _core_schema(kind, crd_dir)


def _core_schema(kind: str, crd_dir: str | None) -> dict:
    cluster = crd_schema("RayCluster", crd_dir)["properties"]["spec"]["properties"]
    head = cluster["headGroupSpec"]["properties"]
    pod_template = to_json_schema(head["template"])
    pod_spec = head["template"]["properties"]["spec"]["properties"]
    selector = to_json_schema(pod_spec["topologySpreadConstraints"]["items"]["properties"]["labelSelector"])
    int32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
    if kind == "Service":
        service = head["headService"]["properties"]
        return _root("v1", kind, to_json_schema(service["spec"]))
    if kind == "Secret":
        strings = {"type": "object", "additionalProperties": {"type": "string"}}
        return _root("v1", kind, {}, required_spec=False, extra={
            "type": {"type": "string"}, "data": strings, "stringData": strings, "immutable": {"type": "boolean"}})
    rolling = {"type": "object", "additionalProperties": False, "properties": {
        "maxSurge": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "maxUnavailable": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "partition": int32}}
    common = {"replicas": int32, "selector": selector, "template": pod_template, "minReadySeconds": int32,
              "revisionHistoryLimit": int32}
    if kind == "Deployment":
        props = {**common, "progressDeadlineSeconds": int32, "paused": {"type": "boolean"},
                 "strategy": {"type": "object", "additionalProperties": False, "properties": {
                     "type": {"enum": ["RollingUpdate", "Recreate"]}, "rollingUpdate": rolling}}}
    elif kind == "StatefulSet":
        claim = copy.deepcopy(to_json_schema(pod_spec["volumes"]["items"]["properties"]["ephemeral"]
                                             ["properties"]["volumeClaimTemplate"]))
        claim["properties"].update({"apiVersion": {"const": "v1"}, "kind": {"const": "PersistentVolumeClaim"}})
        claim["required"] = ["metadata", "spec"]
        claim["properties"]["metadata"]["required"] = ["name"]
        policy = {"enum": ["Retain", "Delete"]}
        props = {**common, "serviceName": {"type": "string"}, "volumeClaimTemplates": {"type": "array", "items": claim},
                 "podManagementPolicy": {"enum": ["OrderedReady", "Parallel"]},
                 "updateStrategy": {"type": "object", "additionalProperties": False, "properties": {
                     "type": {"enum": ["RollingUpdate", "OnDelete"]}, "rollingUpdate": rolling}},
                 "persistentVolumeClaimRetentionPolicy": {"type": "object", "additionalProperties": False,
                                                          "properties": {"whenDeleted": policy, "whenScaled": policy}},
                 "ordinals": {"type": "object", "additionalProperties": False, "properties": {"start": int32}}}
    else:
        raise KeyError(kind)
    spec = {"type": "object", "additionalProperties": False, "required": ["selector", "template"], "properties": props}
    return _root("apps/v1", kind, spec)
