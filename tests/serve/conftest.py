"""A real server (python -m serve under gunicorn) over a registry of the tiny model + trained LoRA adapters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from artifacts import Registry
from tests.conftest import DEMO_HELDOUT, DEMO_TRAIN, ROOT, tiny_overrides
from train.config import load_config
from train.recipe import run

API_KEY = "test-api-key-123"
ADMIN_KEY = "test-admin-key-456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_adapter(tiny_model: Path, work: Path, name: str, seed: int, rank: int = 4, **extra) -> Path:
    """A real LoRA trained for a few steps at a high rate, so its outputs differ from the base's."""
    data = work / f"{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    rows = DEMO_TRAIN.read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[seed * 40:(seed + 1) * 40]) + "\n")
    (data / "eval.jsonl").write_text("\n".join(DEMO_HELDOUT.read_text().splitlines()[:2]) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_model, {"train": data / "train.jsonl", "eval": data / "eval.jsonl"},
                                           work / name, **{"training.max_steps": 6, "training.lr": 5e-2,
                                                           "method.r": rank, "training.seed": seed,
                                                           "eval.compare_base": False, **extra}))
    return run(cfg).root


@pytest.fixture(scope="session")
def adapter_runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("adapters")
    return {"chef-a": train_adapter(tiny_model, work, "chef-a", 1),
            "chef-b": train_adapter(tiny_model, work, "chef-b", 2, **{"method.target_modules": "[q_proj,v_proj,o_proj]"}),
            "chef-c": train_adapter(tiny_model, work, "chef-c", 3),
            "big-rank": train_adapter(tiny_model, work, "big-rank", 4, rank=32)}


def peft_and_fused(tiny_model: Path, adapter_runs: dict[str, Path], dtype=None):
    """(peft reference with adapters a and b, a plain base model, MultiLoRA over it with the same two).
    b targets q/v/o only: a different column layout per layer than a. dtype: fp32 unless given."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serve.engines.multi_lora import MultiLoRA

    dtype = dtype or torch.float32
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype),
                                    str(adapter_runs["chef-a"] / "adapter"), adapter_name="a").eval()
    ref.load_adapter(str(adapter_runs["chef-b"] / "adapter"), adapter_name="b")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).eval()
    lora = MultiLoRA(base)
    lora.load("a", adapter_runs["chef-a"] / "adapter")
    lora.load("b", adapter_runs["chef-b"] / "adapter")
    return ref, base, lora


class Server:
    def __init__(self, registry: Path, env: dict[str, str], port: int):
        self.registry = registry
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = registry.parent / f"server-{port}.log"
        # no fine-tuning worker unless a test asks for one (SERVE_FINETUNE_WORKER): it is a Python process
        # importing the training stack beside every test server, and only the fine-tuning tests use it
        self.env = {"SERVE_FINETUNE_WORKER": "off", **env}
        self.proc = self._spawn("w")

    def _spawn(self, mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "serve", "--registry", str(self.registry), "--port", str(self.port)],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
                                stdout=open(self.log, mode), stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self) -> None:
        """The same server again (same registry, settings and port) after stop(); its log is appended to."""
        self.proc = self._spawn("a")
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # already gone (e.g. it failed to start): nothing to stop
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def base_registry(tiny_model: Path, work: Path) -> Path:
    """A registry holding only the tiny base model (no adapters to train): enough for HTTP-level tests."""
    reg_dir = work / "registry"
    Registry(reg_dir).register_base(tiny_model, "tiny-llama")
    return reg_dir


def start_server(registry: Path, env: dict[str, str]) -> Server:
    """A started, ready server (stopped again if it never gets ready)."""
    s = Server(registry, env, free_port())
    try:
        s.wait_ready()
    except Exception:
        s.stop()
        raise
    return s


@pytest.fixture(scope="session")
def registry(adapter_runs, tmp_path_factory) -> Path:
    reg_dir = tmp_path_factory.mktemp("registry") / "registry"
    reg = Registry(reg_dir)
    reg.publish_run(adapter_runs["chef-a"], "chef-a")
    reg.publish_run(adapter_runs["chef-b"], "chef-b")
    reg.publish_run(adapter_runs["big-rank"], "big-rank")  # refused: rank 32 > the server's max 16
    return reg_dir


@pytest.fixture(scope="session")
def server(registry):
    s = Server(registry, {"SERVE_API_KEY": API_KEY, "SERVE_ADMIN_KEY": ADMIN_KEY, "SERVE_MAX_LORA_RANK": "16",
                          "SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "256", "SERVE_MAX_BODY_BYTES": "65536"},
               free_port())
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
