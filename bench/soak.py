"""Soak: does the Flask server's resident memory stay flat under sustained mixed load (issue 28, item 7)?

Starts `python -m serve` on SmolLM2-135M-Instruct with many random LoRA adapters (r=8 and r=16, all linear
layers), runs a warm-up of mixed load (base + every adapter, streamed and not; tests/reliability/loadgen.py),
then the soak, sampling the RSS of the server and its children every 10 s through both. Growth after warm-up
compares the mean RSS of the soak's last window with its first. Each `--arm LABEL[:KEY=VALUE,...]` is a server
started with those environment variables (e.g. `default:SERVE_MALLOC_ARENAS=0`); arms run one after another.

  .venv/bin/python bench/soak.py [--warmup 60] [--seconds 600] [--clients 32] [--adapters 16] [--arm ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from artifacts import Manifest, Registry, atomic_write_text, tree_sha256  # noqa: E402
from tests.reliability.loadgen import LoadConfig, LoadReport, rss_mb, run_load  # noqa: E402
from tests.serve.conftest import Server, free_port  # noqa: E402

BASE = Path.home() / ".cache/tunestack/models/SmolLM2-135M-Instruct"
OUT = ROOT / "bench/results/soak"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_tensors(cfg: dict, rank: int, seed: int) -> dict:
    """A random LoRA on every linear layer (small B, so replies stay text-like)."""
    import torch

    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shape = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
             "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)
    part = {m: "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp" for m in TARGETS}
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(cfg["num_hidden_layers"]):
        for m, (n_in, n_out) in shape.items():
            key = f"base_model.model.model.layers.{i}.{part[m]}.{m}"
            t[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            t[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    return t


def build_registry(work: Path, n: int) -> list[str]:
    """SmolLM2 as base and `n` random adapters (ranks 8 and 16 alternating) published; returns their names."""
    from safetensors.torch import save_file

    cfg = json.loads((BASE / "config.json").read_text())
    base = {"name": BASE.name, "sha256": tree_sha256(BASE), "path": str(BASE)}
    reg = Registry(work / "registry")
    names = []
    for i in range(n):
        rank, run = (8, 16)[i % 2], work / "runs" / f"a{i:03d}"
        pc = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(BASE)}
        (run / "adapter").mkdir(parents=True)
        (run / "adapter/adapter_config.json").write_text(json.dumps(pc))
        save_file(lora_tensors(cfg, rank, i), str(run / "adapter/adapter_model.safetensors"))
        m = Manifest(kind="run", method="lora", peft_config=pc, base_model=base)
        m.record_files(run, ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"])
        m.write(run)
        reg.publish_run(run, f"a{i:03d}")
        names.append(f"a{i:03d}")
    return names


class Sampler:
    """RSS of a process tree every `period` seconds, as (seconds since start, MB)."""

    def __init__(self, pid: int, period: float) -> None:
        self.pid, self.period, self.samples = pid, period, []
        self.t0, self._stop = time.monotonic(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((round(time.monotonic() - self.t0, 1), round(rss_mb(self.pid), 1)))
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def growth(samples: list[tuple[float, float]], start: float, end: float, window: float) -> dict:
    """Mean RSS of [start, start + window] and [end - window, end]; growth = (last - first) / first."""
    first = [m for t, m in samples if start <= t <= start + window]
    last = [m for t, m in samples if end - window <= t <= end]
    if not first or not last:
        return {}
    a, b = statistics.mean(first), statistics.mean(last)
    return {"first_mb": round(a, 1), "last_mb": round(b, 1), "growth_pct": round(100 * (b - a) / a, 2)}


def run_arm(label: str, env: dict, registry: Path, models: list[str], a: argparse.Namespace) -> dict:
    """One server with `env`: warm-up, soak, RSS samples and the figures."""
    server = Server(registry, {"SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "512", **env}, free_port())
    try:
        server.wait_ready(timeout=600)
        base = next(m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"] if not m.get("parent"))
        mix = [base, *models]
        for m in mix:  # every adapter held before the warm-up: loading them is not what the soak measures
            body = {"model": m, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).raise_for_status()
        with Sampler(server.proc.pid, a.period) as sampler:
            warm = run_load(LoadConfig(server.url, mix, clients=a.clients, seconds=a.warmup))
            t_soak = time.monotonic() - sampler.t0
            soak = run_load(LoadConfig(server.url, mix, clients=a.clients, seconds=a.seconds))
            t_end = time.monotonic() - sampler.t0
    finally:
        server.stop()
    s = sampler.samples
    window = min(a.window, a.seconds / 3)
    res = {"arm": label, "env": env, "clients": a.clients, "warmup_s": a.warmup, "soak_s": a.seconds,
           "window_s": window, "models": len(mix), "after_warmup": growth(s, t_soak, t_end, window),
           "from_start": growth(s, 0, t_end, min(window, a.warmup or window)),
           "warmup": _brief(warm), "soak": _brief(soak), "samples": s}
    print(f"[{label}] RSS after warm-up {res['after_warmup']}, from start {res['from_start']}; "
          f"soak: {soak.line()}", flush=True)
    print(f"[{label}] samples (s, MB): {s}", flush=True)
    return res


def _brief(rep: LoadReport) -> dict:
    return {k: v for k, v in asdict(rep).items() if not k.startswith("rss_")}


def parse_arm(spec: str) -> tuple[str, dict]:
    label, _, rest = spec.partition(":")
    return label, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def machine() -> str:
    """The CPU's model name and core count, for the results (Linux; elsewhere the architecture)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of load before the soak's first window")
    ap.add_argument("--seconds", type=float, default=600.0, help="seconds of soak")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16, help="random adapters in the registry (all in the mix)")
    ap.add_argument("--period", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--window", type=float, default=60.0, help="seconds averaged at each end (at most soak/3)")
    ap.add_argument("--arm", action="append", default=None,
                    help="LABEL[:KEY=VALUE,...]: a server with these environment variables (repeat; default: its settings)")
    a = ap.parse_args()
    arms = [parse_arm(x) for x in a.arm or ["defaults"]]
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        models = build_registry(Path(tmp), a.adapters)
        results = [run_arm(label, env, Path(tmp) / "registry", models, a) for label, env in arms]
    stamp = time.strftime("%Y-%m-%dT%H%M%S", time.gmtime())
    out = OUT / f"{stamp}-{'-'.join(r['arm'] for r in results)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"machine": machine(), "arms": results}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
