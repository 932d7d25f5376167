"""A bounded load generator for the OpenAI API: N client threads, mixed models, streaming and not.

Every loop is bounded twice, in time (`seconds`) and in count (`max_requests` per client), and traffic
goes to 127.0.0.1 only. The server's resident memory is sampled beside the traffic, so the report can
compare the first window with the last. Used by tests/reliability/test_load.py and runnable by hand:

  python -m tests.reliability.loadgen --url http://127.0.0.1:8000 --model chef --model base --pid PID
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

PROMPTS = ["What is the soup of the day?", "Tell me about the dessert menu.", "Once upon a time",
           "Do you have vegetarian dishes?", "The chef walked into the kitchen and", "How late are you open?"]


@dataclass
class LoadConfig:
    url: str
    models: list[str]
    api_key: str = ""
    clients: int = 64  # the full size: 64 concurrent clients
    seconds: float = 60.0  # the full size: 60 s of traffic
    max_requests: int = 10_000  # per client: a second bound, so no loop depends on the clock alone
    max_tokens: tuple[int, int] = (4, 24)  # drawn per request: rows finish at different steps
    stream_share: float = 0.5  # half the requests stream (SSE), half wait for the whole reply
    request_timeout: float = 120.0  # a request that takes longer counts as failed, never hangs the run
    pid: int | None = None  # the server process whose RSS is sampled (None: no memory figures)
    window: float = 10.0  # memory growth compares the mean RSS of the first and the last `window` seconds

    def __post_init__(self) -> None:
        host = urlparse(self.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"{self.url}: the load generator only targets this machine (127.0.0.1)")


@dataclass
class Outcome:
    ok: bool
    latency: float
    tokens: int
    stream: bool
    model: str
    error: str = ""


@dataclass
class LoadReport:
    requests: int
    failed: int
    streamed: int
    seconds: float
    tokens: int
    tokens_per_s: float
    p50_s: float
    p99_s: float
    per_model: dict[str, int]
    rss_first_mb: float | None = None
    rss_last_mb: float | None = None
    rss_growth: float | None = None  # (last - first) / first
    errors: list[str] = field(default_factory=list)  # the first few failures, for the assertion message

    def line(self) -> str:
        mem = f", RSS {self.rss_first_mb:.0f} -> {self.rss_last_mb:.0f} MB ({100 * self.rss_growth:+.1f} %)" \
            if self.rss_growth is not None else ""
        return (f"{self.requests} requests ({self.streamed} streamed), {self.failed} failed, "
                f"{self.tokens_per_s:.1f} tokens/s, p50 {self.p50_s:.2f} s, p99 {self.p99_s:.2f} s{mem}")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn: arbiter + worker), from /proc."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:  # the process ended meanwhile (ENOENT or ESRCH)
            continue
    return total


def _children(pid: int) -> list[int]:
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # the process ended
        return []
    for task in tasks:
        try:
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:  # the thread ended between the listing and the read: ENOENT, or ESRCH (ProcessLookupError)
            continue
    return kids + [g for k in kids for g in _children(k)]


def one_request(client: httpx.Client, cfg: LoadConfig, rng: random.Random) -> Outcome:
    model = rng.choice(cfg.models)
    stream = rng.random() < cfg.stream_share
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(*cfg.max_tokens), "temperature": 0.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        tokens = _stream(client, body) if stream else _plain(client, body)
        return Outcome(True, time.perf_counter() - t0, tokens, stream, model)
    except Exception as e:  # every failure is counted and reported, whatever its kind
        return Outcome(False, time.perf_counter() - t0, 0, stream, model, f"{type(e).__name__}: {e}"[:300])


def _plain(client: httpx.Client, body: dict) -> int:
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
    return r.json()["usage"]["completion_tokens"]


def _stream(client: httpx.Client, body: dict) -> int:
    """The usage chunk's completion tokens; fails unless the stream ends with [DONE] and carries no error."""
    tokens, done = None, False
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error event: {obj['error']}")
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    if not done or tokens is None:
        raise RuntimeError(f"stream ended without [DONE] or usage (done={done}, usage={tokens})")
    return tokens


def _client_loop(cfg: LoadConfig, seed: int, deadline: float, out: list[Outcome]) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    with httpx.Client(base_url=cfg.url, headers=headers, timeout=cfg.request_timeout) as client:
        for _ in range(cfg.max_requests):
            if time.monotonic() >= deadline:
                return
            out.append(one_request(client, cfg, rng))


def _sample_rss(pid: int, stop: threading.Event, t0: float, samples: list[tuple[float, float]]) -> None:
    while not stop.wait(0.5):
        try:
            samples.append((time.monotonic() - t0, rss_mb(pid)))
        except OSError:  # a thread or process ended mid-read (the listing itself, too): skip this sample, take the next
            continue


def run_load(cfg: LoadConfig) -> LoadReport:
    """Run the clients until `seconds` pass (or each has sent `max_requests`), then wait for them to finish."""
    outcomes: list[list[Outcome]] = [[] for _ in range(cfg.clients)]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + cfg.seconds
    threads = [threading.Thread(target=_client_loop, args=(cfg, i, deadline, outcomes[i]), daemon=True)
               for i in range(cfg.clients)]
    sampler = threading.Thread(target=_sample_rss, args=(cfg.pid, stop, t0, samples), daemon=True) if cfg.pid else None
    for t in [*threads, *([sampler] if sampler else [])]:
        t.start()
    for t in threads:
        t.join(cfg.seconds + cfg.request_timeout + 30)  # a client stuck past its request timeout is a failure
    stuck = sum(t.is_alive() for t in threads)
    stop.set()
    elapsed = time.monotonic() - t0
    return _report(cfg, [o for os_ in outcomes for o in os_], samples, elapsed, stuck)


def _report(cfg: LoadConfig, outs: list[Outcome], samples: list[tuple[float, float]], elapsed: float,
            stuck: int) -> LoadReport:
    lat = sorted(o.latency for o in outs if o.ok) or [float("nan")]
    tokens = sum(o.tokens for o in outs)
    per_model: dict[str, int] = {}
    for o in outs:
        per_model[o.model] = per_model.get(o.model, 0) + 1
    rep = LoadReport(requests=len(outs), failed=sum(not o.ok for o in outs) + stuck,
                     streamed=sum(o.stream for o in outs), seconds=elapsed, tokens=tokens,
                     tokens_per_s=tokens / elapsed, p50_s=statistics.median(lat),
                     p99_s=lat[min(len(lat) - 1, int(0.99 * len(lat)))], per_model=per_model,
                     errors=[o.error for o in outs if not o.ok][:5] + ([f"{stuck} clients stuck"] if stuck else []))
    first = [m for t, m in samples if t <= cfg.window]
    last = [m for t, m in samples if t >= min(cfg.seconds, elapsed) - cfg.window]
    if first and last:
        rep.rss_first_mb, rep.rss_last_mb = statistics.mean(first), statistics.mean(last)
        rep.rss_growth = (rep.rss_last_mb - rep.rss_first_mb) / rep.rss_first_mb
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", action="append", required=True, help="a served model name (repeat to mix)")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--pid", type=int, default=None, help="server PID whose RSS to sample")
    a = ap.parse_args()
    rep = run_load(LoadConfig(a.url, a.model, a.api_key, a.clients, a.seconds, pid=a.pid))
    print(rep.line())
    print(json.dumps(asdict(rep), indent=1))


if __name__ == "__main__":
    main()
