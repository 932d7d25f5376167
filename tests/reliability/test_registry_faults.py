"""Registry faults while adapters serve: each bad publish is refused with its reason on the admin API, and
the other adapters keep answering exactly as before (greedy outputs before == during == after).

The Flask backend runs in-process on the tiny model (TorchEngine + AdapterSync + the app) behind werkzeug's
threaded server on 127.0.0.1, so completions and the admin API are real HTTP. The watcher's thread is
started with a long period and each test runs its registry pass itself (`sync.sync_once()`, what the
thread runs), so a fault is judged exactly once and its state stays on the admin API to be read.
Adapters are random LoRAs written in the run layout train produces (no training: the suite stays small).
"""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import pytest
import torch
from safetensors.torch import save_file

from artifacts import Manifest, Registry
from artifacts.checksums import tree_sha256

ADMIN_KEY = "reliability-admin-key-0002"
MAX_RANK = 16  # the server's limit: a rank-32 adapter is refused
BASE = "tiny-llama"
SERVING = ("alpha", "beta")  # the adapters that must keep serving
PROMPTS = ("The menu", "Soup of the day is")


# -- adapters in the run layout ----------------------------------------------------------------------
def lora_tensors(tiny_model: Path, rank: int, seed: int, targets=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:
    """Random LoRA A/B for every layer's targets, loud enough (B ~ N(0, 1)) to change greedy outputs."""
    cfg = json.loads((tiny_model / "config.json").read_text())
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    out = {"q_proj": cfg["hidden_size"], "k_proj": cfg["num_key_value_heads"] * head,
           "v_proj": cfg["num_key_value_heads"] * head, "o_proj": cfg["hidden_size"]}
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in targets:
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[f"{key}.lora_A.weight"] = torch.randn(rank, cfg["hidden_size"], generator=g) / cfg["hidden_size"] ** 0.5
            t[f"{key}.lora_B.weight"] = torch.randn(out[m], rank, generator=g)
    return t


def make_run(tiny_model: Path, out: Path, seed: int, rank: int = 4, declared_rank: int | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A finished run folder (adapter/ + manifest.json with checksums) holding a random LoRA.
    declared_rank: what adapter_config.json and the manifest say (default: the tensors' rank)."""
    r = declared_rank or rank
    pc = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj"], "bias": "none",
          "task_type": "CAUSAL_LM", "base_model_name_or_path": str(tiny_model)}
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(pc))
    save_file(tensors if tensors is not None else lora_tensors(tiny_model, rank, seed),
              str(out / "adapter" / "adapter_model.safetensors"))
    return record_run(out, tiny_model, pc)


def record_run(out: Path, tiny_model: Path, pc: dict) -> Path:
    """Write the run's manifest over whatever adapter/ holds now (checksums match the files)."""
    m = Manifest(kind="run", method="lora", peft_config=pc,
                 base_model={"name": BASE, "sha256": tree_sha256(tiny_model), "path": str(tiny_model)})
    m.record_files(out, sorted(p.relative_to(out).as_posix() for p in (out / "adapter").iterdir()))
    m.write(out)
    return out


# -- the in-process server -----------------------------------------------------------------------------
class HookedLoader:
    """The engine as AdapterSync's Loader, with a hook run between the check and the load (per name, once)."""

    def __init__(self, engine):
        self.engine = engine
        self.before_load: dict[str, Callable[[str], None]] = {}

    def load_adapter(self, name: str, path: str) -> None:
        hook = self.before_load.pop(name, None)
        if hook is not None:
            hook(path)
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)


@dataclass
class Stack:
    url: str
    registry: Registry
    sync: object  # AdapterSync
    engine: object  # TorchEngine
    loader: HookedLoader
    work: Path
    model_dir: Path  # the base model folder the adapters are made for
    stop: Callable[[], None]


def start_stack(tiny_model: Path, work: Path, names: dict[str, int], poll_seconds: float = 3600,
                max_batch: int = 8) -> Stack:
    """Publish `names` (name -> seed) into a fresh registry and serve it on a free local port."""
    from werkzeug.serving import make_server

    from lm.loading import module_names
    from serve.registry_sync import AdapterSync
    from serve.http.app import build_app, set_serving
    from serve.engines.torch_engine import TorchEngine
    from serve.metrics import Metrics
    from serve.flask_backend.serving import OpenAIServing
    from serve.settings import Settings

    reg = Registry(work / "registry")
    for name, seed in names.items():
        reg.publish_run(make_run(tiny_model, work / "runs" / name, seed), name)
    base_name, base_path = reg.base()
    engine = TorchEngine(str(base_path), base_name, max_batch=max_batch, max_model_len=256)
    loader = HookedLoader(engine)
    metrics = Metrics()
    sync = AdapterSync(reg, loader, reg.manifest("base", base_name).base_model["sha256"],
                       module_names(engine.base), MAX_RANK, metrics, poll_seconds)
    sync.start()
    app = build_app(Settings(admin_key=ADMIN_KEY, max_lora_rank=MAX_RANK), None, metrics)
    set_serving(app, OpenAIServing(engine, sync, metrics), sync)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="test-http", daemon=True).start()

    def stop() -> None:
        server.shutdown()
        sync.stop()
        engine.shutdown()

    return Stack(f"http://127.0.0.1:{server.port}", reg, sync, engine, loader, work, tiny_model, stop)


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})


def admin_states(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["adapters"]


def answers(url: str) -> dict[tuple[str, str], str]:
    out = {}
    for model in (BASE, *SERVING):
        for prompt in PROMPTS:
            r = complete(url, model, prompt)
            assert r.status_code == 200, r.text
            out[model, prompt] = r.json()["choices"][0]["text"]
    return out


class Traffic:
    """Greedy requests on the serving adapters and the base, in a loop, while a fault is published."""

    def __init__(self, url: str, expected: dict[tuple[str, str], str]):
        self.url, self.expected = url, expected
        self.seen: list[tuple[str, str, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        for _ in range(500):  # bounded in count as well as by the stop event
            for (model, prompt) in self.expected:
                r = complete(self.url, model, prompt)
                self.seen.append((model, prompt, r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text))
            if self._stop.is_set():
                return

    def assert_unchanged(self) -> None:
        assert self.seen, "no request ran while the fault was published"
        wrong = [s for s in self.seen if s[2] != 200 or s[3] != self.expected[s[0], s[1]]]
        assert not wrong, wrong[:3]


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    s = start_stack(tiny_model, tmp_path_factory.mktemp("registry-faults"), {"alpha": 1, "beta": 2})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def baseline(stack) -> dict[tuple[str, str], str]:
    before = answers(stack.url)
    for prompt in PROMPTS:  # precondition: the adapters really change the answers
        assert before["alpha", prompt] != before[BASE, prompt] or before["beta", prompt] != before[BASE, prompt]
    return before


# -- the faults: each publishes `name` broken in one way, and returns the reason the server must give -------
def _published(stack: Stack, name: str, seed: int = 7, **run) -> Path:
    """Publish a good random adapter as `name`; the registry folder it serves from."""
    stack.registry.publish_run(make_run(stack.model_dir, stack.work / "runs" / name, seed, **run), name)
    return stack.registry.path("adapters", name)


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # a hard link into the run: never write through it
    path.write_bytes(data)


def truncated_safetensors(stack: Stack, name: str) -> str:
    run = make_run(stack.model_dir, stack.work / "runs" / name, 7)
    f = run / "adapter" / "adapter_model.safetensors"
    _rewrite(f, f.read_bytes()[: f.stat().st_size // 2])
    stack.registry.publish_run(record_run(run, stack.model_dir, json.loads(
        (run / "adapter" / "adapter_config.json").read_text())), name)  # checksums match: the loader meets it
    return "SafetensorError"


def checksum_mismatch(stack: Stack, name: str) -> str:
    f = _published(stack, name) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-8:] = b"\x00" * 8
    _rewrite(f, bytes(data))
    return "sha256 does not match the manifest"


def another_base(stack: Stack, name: str) -> str:
    folder = _published(stack, name)
    m = Manifest.read(folder)
    m.base_model = {**m.base_model, "name": "other-base", "sha256": "f" * 64}
    m.write(folder)  # as a hand-copied entry would be: the registry's own publish refuses another base
    return "trained on base other-base"


def rank_above_limit(stack: Stack, name: str) -> str:
    _published(stack, name, rank=32)
    return f"LoRA rank 32 exceeds this server's max LoRA rank {MAX_RANK}"


def pickle_bin(stack: Stack, name: str) -> str:
    run = make_run(stack.model_dir, stack.work / "runs" / name, 7)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    marker = stack.work / f"{name}-pickle-ran"
    # A pickle that creates a file when loaded: proof that nothing unpickled it.
    (run / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    stack.registry.publish_run(record_run(run, stack.model_dir, json.loads(
        (run / "adapter" / "adapter_config.json").read_text())), name)
    return "adapter_model.bin: pickled weights"


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def manifest_not_json(stack: Stack, name: str) -> str:
    (_published(stack, name) / "manifest.json").write_text("{ this is not json")
    return "not valid JSON"


def manifest_lies_about_rank(stack: Stack, name: str) -> str:
    """Beyond the issue's list: the manifest says rank 4, the adapter_config.json the loader reads says 32."""
    folder = _published(stack, name, rank=32)
    m = Manifest.read(folder)
    m.peft_config = {**m.peft_config, "r": 4}
    m.write(folder)
    return f"adapter_config.json: LoRA rank 32 exceeds this server's max LoRA rank {MAX_RANK}"


def tensors_above_declared_rank(stack: Stack, name: str) -> str:
    """Beyond the issue's list: config and manifest say rank 4, the tensors hold rank 32."""
    _published(stack, name, declared_rank=4, tensors=lora_tensors(stack.model_dir, 32, 7))
    return "has LoRA rank 32, adapter_config.json declares 4"


def deleted_mid_load(stack: Stack, name: str) -> str:
    folder = _published(stack, name)
    stack.loader.before_load[name] = lambda path: shutil.rmtree(folder)  # after the check, before the engine reads
    return "adapter files disappeared during the load"


FAULTS = [truncated_safetensors, checksum_mismatch, another_base, rank_above_limit, pickle_bin, manifest_not_json,
          manifest_lies_about_rank, tensors_above_declared_rank, deleted_mid_load]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_fault_is_refused_with_its_reason_and_others_serve_unchanged(stack, baseline, fault):
    name = fault.__name__.replace("_", "-")
    with Traffic(stack.url, baseline) as traffic:
        reason = fault(stack, name)
        stack.sync.sync_once()  # the watcher's pass over the registry
        st = admin_states(stack.url)[name]
    traffic.assert_unchanged()
    assert st["state"] in ("refused", "failed") and reason in st["reason"], st
    assert complete(stack.url, name, PROMPTS[0]).status_code == 404
    assert name not in stack.engine.adapters, "nothing of a refused adapter may stay in the engine"
    assert answers(stack.url) == baseline
    if fault is pickle_bin:
        assert not (stack.work / f"{name}-pickle-ran").exists()
    stack.registry.unpublish("adapters", name)
    stack.sync.sync_once()
    assert name not in admin_states(stack.url)


def test_admin_load_reports_a_deletion_mid_load(stack, baseline):
    """The admin API's own load path meets the same fault: 422 with the reason, the others unchanged."""
    name = "deleted-via-admin"
    folder = _published(stack, name)
    with Traffic(stack.url, baseline) as traffic:
        stack.loader.before_load[name] = lambda path: shutil.rmtree(folder)
        r = httpx.post(f"{stack.url}/admin/adapters/{name}/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=30)
    traffic.assert_unchanged()
    assert r.status_code == 422 and "adapter files disappeared during the load" in r.json()["reason"], r.text
    assert admin_states(stack.url)[name]["state"] == "failed"
    stack.registry.unpublish("adapters", name)
    stack.sync.sync_once()
    assert name not in admin_states(stack.url) and answers(stack.url) == baseline
