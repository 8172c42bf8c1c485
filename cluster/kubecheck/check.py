"""Every manifest in cluster/ validated offline (`vlit cluster check`, `make cluster-check`).

    report = check_files(["cluster/rayjob.yaml"], root=".")
    for problem in report.problems: print(problem)   # FILE: KIND NAME: field.path: message

Per document: its schema (`kubecheck.schemas`: the KubeRay v1.7.0 CRDs read strictly, or
the core kinds), then the rules of `kubecheck.rules`. With a repository `root`, the
manifests are also checked against the project they run (paths in manifests are
repository paths, since the image's working directory is a copy of the repository):

- a RayService annotated `vlit/serve-config: configs/serve/X.yaml` carries, as its
  `serveConfigV2`, exactly what `vlit.serve.app.deploy_config` makes of that config
  (`sync_serve_config` rewrites it, keeping the rest of the file as it is: ruamel.yaml's
  round trip), and its cluster has the GPUs its deployments ask for;
- a RayJob whose entrypoint is `python jobs/X.py --config FILE [key=value ...]` names a
  job script and a config that exist and validate (with those overrides), joins the
  cluster (`ray.address` set) rather than starting an embedded Ray, keeps its data off
  the pods' disks, and asks for no more GPU workers than its cluster can hold.

YAML is read as kubectl reads it, plus one strictness: a key given twice in a mapping is
an error (YAML loaders keep the last one silently).
"""
from __future__ import annotations

import difflib
import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import celpy
import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

from kubecheck import rules
from kubecheck.schemas import CORE_KINDS, CRDS, SchemaError, schema_for

SERVE_CONFIG_ANNOTATION = "vlit/serve-config"


@dataclass(frozen=True)
class Problem:
    file: str
    obj: str  # "RayJob vlit-two-stage", or "document 2" when it has no kind and name
    path: str  # the field, dotted ("" for the whole document)
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.obj}: {self.path or '<document>'}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    objects: list[tuple[str, str, str]] = field(default_factory=list)  # (file, kind, name)
    # Secret name -> {key: required}; a key only `optional: true` references is not required.
    secrets: dict[str, dict[str, bool]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def format_path(parts) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{json.dumps(str(p))}]"
    return out


# ---- YAML ----------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)  # merge keys (<<) first: a merged key may be overridden
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen and key_node.start_mark.line != seen[key]:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in this mapping", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_StrictLoader) if d is not None]


# ---- schema validation ---------------------------------------------------------------------

def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type map/set: no two items with the same key (or value)."""
    if not isinstance(instance, list):
        return
    keys, defaults = schema.get("x-list-map-keys") or [], schema.get("x-list-key-defaults") or {}
    seen: dict = {}
    for i, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            key = tuple(item.get(k, defaults.get(k)) for k in keys)
            label = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
        else:
            key = label = json.dumps(item, sort_keys=True, default=str)
        if key in seen:
            yield ValidationError(f"duplicate entry ({label}), also at [{seen[key]}]", path=[i])
        else:
            seen[key] = i


@functools.lru_cache(maxsize=64)
def _cel_program(expr: str):
    env = celpy.Environment()
    return env.program(env.compile(expr))


def _cel(validator, cel_rules, instance, schema):
    """x-kubernetes-validations: each rule evaluated by a CEL interpreter (cel-python) with
    `self` bound to the field's value, as the API server does. Transition rules (oldSelf)
    apply to updates only; a rule that fails to evaluate is reported, never passed."""
    for rule in cel_rules:
        expr = rule["rule"].strip()
        if "oldSelf" in expr:
            continue
        try:
            ok = _cel_program(expr).evaluate({"self": celpy.json_to_cel(instance)})
        except (celpy.CELParseError, celpy.CELEvalError) as e:
            yield ValidationError(f"cannot evaluate the CRD's validation rule {expr!r}: {e}")
            continue
        if isinstance(ok, celpy.CELEvalError):  # an error value, e.g. a missing field
            yield ValidationError(f"cannot evaluate the CRD's validation rule {expr!r}: {ok}")
        elif not bool(ok):
            yield ValidationError(rule.get("message") or f"fails {expr}")


def _integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)  # 1.0 is not an integer here


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-list-type": _list_type, "x-cel": _cel},
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _integer),
)
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _explain(e: ValidationError) -> Iterator[tuple[tuple, str]]:
    path = tuple(e.absolute_path)
    if e.validator == "additionalProperties" and e.validator_value is False and isinstance(e.instance, dict):
        known = list((e.schema.get("properties") or {}))
        for key in e.instance:
            if key in known:
                continue
            if not path and key == "status":
                yield ("status",), "status is written by the controller; a manifest does not set it"
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (known: {', '.join(known)})" if known and len(known) <= 12 else "")
            yield (*path, key), f"unknown field{hint}"
    elif e.validator == "required":
        m = re.match(r"^'(.+)' is a required property$", e.message)
        yield ((*path, m.group(1)), "required field is missing") if m else (path, e.message)
    elif e.validator == "type":
        want = e.validator_value if isinstance(e.validator_value, list) else [e.validator_value]
        got = _JSON_TYPES.get(type(e.instance), type(e.instance).__name__)
        yield path, f"expected {' or '.join(want)}, got {got} {_short(e.instance)}"
    elif e.validator == "const":
        yield path, f"expected {e.validator_value!r}, got {_short(e.instance)}"
    elif e.validator == "enum":
        yield path, f"{_short(e.instance)} is not one of {e.validator_value}"
    elif e.validator == "anyOf" and {"integer", "string"} <= {s.get("type") for s in e.validator_value}:
        got = _JSON_TYPES.get(type(e.instance), type(e.instance).__name__)
        yield path, f"expected an integer or a string, got {got} {_short(e.instance)}"
    elif e.validator in ("anyOf", "oneOf", "allOf") and e.context:
        yield from _explain(best_match(e.context))
    else:
        yield path, e.message


def schema_problems(doc: dict, crd_dir: str | None = None) -> Iterator[tuple[tuple, str]]:
    validator = _Validator(schema_for(doc["kind"], crd_dir))
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    for e in errors:
        yield from _explain(e)


# ---- the project behind the manifests ----------------------------------------------------

def _gpus(group: dict) -> float:
    limit = rules.dig(group, "template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu") or 0
    try:
        return float(limit)
    except (TypeError, ValueError):
        return 0.0


def cluster_gpus(cluster: dict) -> tuple[float, float]:
    """(GPUs at the autoscaler's maximum, GPUs of the largest pod) of a cluster spec."""
    total, largest = _gpus(cluster.get("headGroupSpec") or {}), _gpus(cluster.get("headGroupSpec") or {})
    for _, group in rules.mappings(cluster.get("workerGroupSpecs")):
        hosts, most = group.get("numOfHosts", 1), group.get("maxReplicas", 2**31 - 1)
        if isinstance(hosts, int) and isinstance(most, int):
            total += _gpus(group) * most * hosts
        largest = max(largest, _gpus(group))
    return total, largest


def serve_config_for(config: Path) -> dict:
    """Ray Serve's config (a RayService's serveConfigV2) for a vlit config file."""
    from vlit.config import load_config
    from vlit.serve.app import deploy_config

    return deploy_config(load_config(str(config)))


def _first_difference(a, b, at=()) -> tuple[tuple, object, object] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return (*at, key), a.get(key, "<absent>"), b.get(key, "<absent>")
            if (d := _first_difference(a[key], b[key], (*at, key))) is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := _first_difference(x, y, (*at, i))) is not None:
                return d
        return None
    return None if a == b else (at, a, b)


def _serve_problems(doc: dict, root: Path, file: str) -> Iterator[tuple[tuple, str]]:
    ref = rules.dig(doc, "metadata", "annotations", SERVE_CONFIG_ANNOTATION)
    if not isinstance(ref, str):
        return
    at = ("metadata", "annotations", SERVE_CONFIG_ANNOTATION)
    config = root / ref
    if not config.exists():
        yield at, f"{ref} not found under {root} (run from the repository root or pass --root)"
        return
    try:
        expected = serve_config_for(config)
    except Exception as e:  # a config error names its key; an import error names the package
        yield at, f"{ref}: {type(e).__name__}: {e}"
        return
    actual = rules.dig(doc, "spec", "serveConfigV2")
    try:
        actual = yaml.safe_load(actual) if isinstance(actual, str) else actual
    except yaml.YAMLError:
        return  # the serveConfigV2 rule says so
    if (d := _first_difference(actual, expected)) is not None:
        where, here, there = d
        yield ("spec", "serveConfigV2", *where), (
            f"differs from {ref}: {_short(here)} here, {_short(there)} there; "
            f"regenerate with `vlit cluster sync {file}`")
    cluster = rules.dig(doc, "spec", "rayClusterConfig") or {}
    total, largest = cluster_gpus(cluster)
    apps = (expected.get("applications") or [{}])[0].get("args") or {}
    wanted = 0.0
    for pool in ("generators", "judges"):
        for name, entry in (apps.get(pool) or {}).items():
            dep = entry.get("deployment") or {}
            wanted += dep.get("num_gpus", 0) * dep.get("num_replicas", 1)
            if dep.get("num_gpus", 0) > largest:
                yield ("spec", "rayClusterConfig"), (f"{pool[:-1]} {name!r} wants {dep['num_gpus']:g} GPUs a replica; "
                                                     f"the largest pod here has {largest:g}")
    if wanted > total:
        yield ("spec", "rayClusterConfig"), f"{ref} asks for {wanted:g} GPUs; this cluster scales to {total:g}"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _job_problems(doc: dict, root: Path) -> Iterator[tuple[tuple, str]]:
    entrypoint = rules.dig(doc, "spec", "entrypoint")
    if not isinstance(entrypoint, str):
        return
    at = ("spec", "entrypoint")
    try:
        argv = shlex.split(entrypoint)
    except ValueError as e:
        yield at, f"cannot split into arguments: {e}"
        return
    if len(argv) < 2 or not argv[0].startswith("python") or "--config" not in argv:
        return  # not a vlit job entry point
    script = argv[1]
    if not (root / script).exists():
        yield at, f"{script} not found under {root}"
    i = argv.index("--config")
    if i + 1 >= len(argv):
        yield at, "--config needs a file"
        return
    ref, overrides = argv[i + 1], [a for a in argv[i + 2:] if "=" in a and not a.startswith("-")]
    from vlit.config import ConfigError, load_config

    try:
        cfg = load_config(str(root / ref), overrides)
    except ConfigError as e:
        yield at, f"{ref}: {e}"
        return
    if cfg.ray.address is None:
        yield at, f"{ref}: ray.address is not set, so the job would start its own Ray instead of using the cluster (set ray.address: auto)"
    for key, uri in (("corpus.out", cfg.corpus.out if cfg.corpus else None),
                     ("train.output", cfg.train.output if cfg.train else None)):
        if uri is not None and _is_local(uri):
            yield at, f"{ref}: {key} is a local path ({uri}); pods' disks go with the cluster: use s3://"
    cluster = rules.dig(doc, "spec", "rayClusterSpec")
    if cfg.train is not None and cfg.train.use_gpu and isinstance(cluster, dict):
        total, _ = cluster_gpus(cluster)
        if cfg.train.num_workers > total:
            yield at, f"{ref}: train.num_workers {cfg.train.num_workers} GPU workers, but the cluster scales to {total:g} GPUs"


# ---- files ---------------------------------------------------------------------------------

def _secret_refs(node, out: dict[str, dict[str, bool]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretKeyRef" and isinstance(value, dict) and isinstance(value.get("name"), str):
                keys = out.setdefault(value["name"], {})
                keys[str(value.get("key"))] = keys.get(str(value.get("key")), False) or value.get("optional") is not True
            elif key == "secretRef" and isinstance(value, dict) and isinstance(value.get("name"), str):
                out.setdefault(value["name"], {})
            else:
                _secret_refs(value, out)
    elif isinstance(node, list):
        for value in node:
            _secret_refs(value, out)


def check_document(doc, crd_dir: str | None = None, root: Path | None = None, file: str = "") -> list[tuple[tuple, str]]:
    """(path, message) for each problem of one parsed manifest."""
    if not isinstance(doc, dict):
        return [((), f"a manifest is a mapping, not {type(doc).__name__}")]
    kind = doc.get("kind")
    if kind not in CRDS and kind not in CORE_KINDS:
        return [(("kind",), f"{kind!r} is not a kind this checker knows ({', '.join([*CRDS, *CORE_KINDS])})")]
    found = list(schema_problems(doc, crd_dir))
    found += list(rules.apply_rules(doc))
    if root is not None and kind == "RayService":
        found += list(_serve_problems(doc, root, file))
    if root is not None and kind == "RayJob":
        found += list(_job_problems(doc, root))
    return found


def check_files(paths, root=None, crd_dir=None) -> Report:
    """Check every document of every file; `root` (the repository) enables the project checks."""
    report = Report()
    root = Path(root) if root is not None else None
    for path in map(Path, paths):
        name = str(path)
        try:
            docs = load_documents(path)
        except (OSError, yaml.YAMLError) as e:
            report.problems.append(Problem(name, "-", "", f"cannot read: {str(e).strip()}"))
            continue
        if not docs:
            report.problems.append(Problem(name, "-", "", "no manifests in this file"))
        for i, doc in enumerate(docs, start=1):
            kind, obj_name = (doc.get("kind"), rules.dig(doc, "metadata", "name")) if isinstance(doc, dict) else (None, None)
            obj = f"{kind} {obj_name}" if kind and obj_name else f"document {i}"
            try:
                found = check_document(doc, crd_dir, root, name)
            except SchemaError as e:
                found = [((), str(e))]
            report.problems += [Problem(name, obj, format_path(at), msg) for at, msg in found]
            report.objects.append((name, str(kind), str(obj_name)))
            _secret_refs(doc, report.secrets)
    return report


def sync_serve_config(path, root) -> list[str]:
    """Rewrite the serveConfigV2 of each RayService in `path` that names its config
    (annotation vlit/serve-config) from that config; comments and layout elsewhere are
    kept (ruamel.yaml round trip). Returns the names of the RayServices rewritten."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.scalarstring import LiteralScalarString

    path, root = Path(path), Path(root)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # the layout of cluster/*.yaml
    docs = list(rt.load_all(path.read_text()))
    changed = []
    for doc in docs:
        ref = rules.dig(doc, "metadata", "annotations", SERVE_CONFIG_ANNOTATION)
        if not isinstance(doc, dict) or doc.get("kind") != "RayService" or not isinstance(ref, str):
            continue
        if "serveConfigV2" not in (doc.get("spec") or {}):
            raise ValueError(f"{path}: RayService {doc['metadata'].get('name')} has no serveConfigV2 key to rewrite")
        expected = serve_config_for(root / ref)
        current = doc["spec"]["serveConfigV2"]
        if isinstance(current, str) and yaml.safe_load(current) == expected:
            continue
        doc["spec"]["serveConfigV2"] = LiteralScalarString(
            yaml.safe_dump(expected, sort_keys=False, default_flow_style=False, width=120))
        changed.append(doc["metadata"].get("name"))
    if changed:
        out = io.StringIO()
        rt.dump_all(docs, out)
        path.write_text(out.getvalue())
    return changed
