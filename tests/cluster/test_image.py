"""cluster/Dockerfile installs the pinned stack of pyproject.toml and runs as non-root."""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    out = {}
    for req in PROJECT["dependencies"]:
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", req):
            out[m.group(1).lower()] = m.group(3)
    return out


def stages() -> dict[str, str]:
    """Stage name -> its instructions (lines continued with \\ joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    parts = re.split(r"(?m)^FROM ", text)[1:]
    return {p.split("\n", 1)[0].split(" AS ")[1].strip(): "FROM " + p for p in parts}


def user_of(stage: str) -> str | None:
    """The USER a stage runs as, inherited from the stage it builds on."""
    all_stages = stages()
    users = re.findall(r"(?m)^USER (\S+)", all_stages[stage])
    if users:
        return users[-1]
    base = all_stages[stage].split()[1]
    return user_of(base) if base in all_stages else None


def test_base_image_matches_ray_and_python_pins():
    m = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu AS vlit-base$", DOCKERFILE, re.M)
    assert m, "the vlit stage builds on Ray's GPU image"
    assert m.group(1) == pins()["ray"]
    python = (int(m.group(2)), int(m.group(3)))
    bounds = re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", PROJECT["requires-python"])
    assert (int(bounds[1]), int(bounds[2])) <= python < (int(bounds[3]), int(bounds[4]))
    assert f"python:{python[0]}.{python[1]}-slim" in DOCKERFILE  # the MLflow stage: the same Python


def test_default_target_is_the_vlit_image():
    assert list(stages())[-1] == "vlit" and stages()["vlit"].split()[1] == "vlit-base"
    assert stages()["serve"].split()[1] == "vlit-base"


def test_torch_is_the_pinned_version_from_the_cuda_index():
    vlit = stages()["vlit-base"]
    assert re.search(rf'--index-url "\$\{{TORCH_INDEX_URL\}}" torch=={re.escape(pins()["torch"])}\b', vlit)
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", vlit)
    # Then the project itself, with every pin of pyproject.toml, and a consistency check.
    assert "pip install . " in vlit and "pip check" in vlit


def test_mlflow_stage_pins_match():
    mlflow = stages()["mlflow"]
    for name in ("mlflow", "boto3", "botocore"):
        assert f"{name}=={pins()[name]}" in mlflow, name
    assert "psycopg2-binary==" in mlflow  # the PostgreSQL backend store


def test_every_stage_runs_as_a_numeric_non_root_user():
    for name in stages():
        user = user_of(name)
        assert user and user.isdigit() and user != "0", name


def test_copied_paths_exist_and_pass_the_ignore_file():
    ignore = [l.strip() for l in (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    for src in re.findall(r"(?m)^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE):
        for path in src.split():
            assert (REPO / path).exists(), path
            excluded = False
            for pattern in ignore:  # the last matching line wins
                negate, pat = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
                if fnmatch.fnmatch(path, pat):
                    excluded = not negate
            assert not excluded, f"{path} is excluded from the build context"


def test_deepspeed_configs_path_is_the_image_s_copy():
    workdir = re.search(r"(?m)^WORKDIR (\S+)", stages()["vlit-base"]).group(1)
    configs = re.search(r"VLIT_DEEPSPEED_CONFIGS=(\S+)", DOCKERFILE).group(1)
    assert configs == f"{workdir}/configs/deepspeed" and (REPO / "configs" / "deepspeed" / "zero3.json").exists()
    assert re.search(r"(?m)^COPY --chown=1000:100 configs \./configs$", DOCKERFILE)
