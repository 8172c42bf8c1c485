# Every target that runs code depends on `setup`, which (re)builds .venv when it is
# missing or older than pyproject.toml / this Makefile.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo cluster-demo bench cluster-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# Prebuild DeepSpeed's CPU shared-memory op so the first training run does not
	# compile it (~40 s of g++ inside a test otherwise). --no-cache-dir: the install
	# above cached a wheel built without the op, which pip would otherwise reuse.
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PY) -m pip install -q --no-cache-dir --no-build-isolation \
	  --no-deps --force-reinstall deepspeed==0.19.8
	$(PY) -c "from deepspeed.git_version_info import installed_ops as o; assert o['deepspeed_shm_comm'], o"
	$(PY) -m pip check
	# vLLM's Python layer in a folder of its own (not the venv): Ray Serve LLM imports it,
	# and a CPU test builds LLMServer deployments with it (tests/serve/test_llm.py).
	$(PY) tests/support/vllm_python.py $(VENV)/vllm-python
	# Headless Chromium (Debian's package, ~2 min) for the tests that look at the run report
	# and the MLflow UI as a person would (tests/test_run_report.py); installed where missing.
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -ra --durations=25 tests

demo: setup
	$(PY) jobs/two_stage.py --config configs/demo.yaml

# The demo job on a Ray head and two worker nodes on this machine, S3 and MLflow on
# PostgreSQL on loopback (README, "A multi-node cluster on this machine"); tears it down.
cluster-demo: setup
	$(PY) tests/support/topology.py demo

bench: setup
	$(PY) bench/prepare_bench.py --instances 100000
	$(PY) bench/stream_bench.py
	$(PY) bench/sft_bench.py
	$(PY) bench/serve_bench.py

# Validate cluster/*.yaml offline (KubeRay v1.7.0 CRDs in ../shared/kuberay-crds); also part of `make test`.
cluster-check: setup
	$(VENV)/bin/vlit cluster check

clean:
	rm -rf $(VENV) .vlit build *.egg-info platform/*.egg-info
