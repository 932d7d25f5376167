"""What a large registry costs the server's registry sync: start-up, each poll, and publish -> servable.

Builds a registry of N adapters (one tiny real LoRA published under N names, each with its pinned
name@v1: 2N entries, as after N first publishes), then times serve.registry_sync.AdapterSync with a
loader that holds nothing (the engine's own load time is measured by bench/serve_throughput.py):

  start-up   the first sync_once(): every entry listed, checked and handed to the loader
  poll       sync_once() with nothing changed: what the server pays every poll_seconds (median of 20)
  publish    a new version of one name published, then one sync_once(): until it is servable

  python bench/registry_poll.py --adapters 1000 --out bench/results/registry_poll.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class NullLoader:
    """Holds nothing: isolates the sync's own cost from the engine's."""

    def __init__(self) -> None:
        self.loads = 0

    def load_adapter(self, name: str, path: str) -> None:
        self.loads += 1

    def unload_adapter(self, name: str) -> None:
        pass


def tiny_run(work: Path) -> tuple[Path, Path]:
    """(base model folder, one trained tiny LoRA run): the test suite's tiny model and adapter recipe."""
    from tests.conftest import build_tiny_llama
    from tests.serve.conftest import train_adapter

    model = build_tiny_llama(work / "tiny-llama")
    return model, train_adapter(model, work / "runs", "menu", 1)


def build_registry(work: Path, n: int):
    from artifacts import Registry

    model, run = tiny_run(work)
    reg = Registry(work / "registry")
    reg.register_base(model, "tiny-llama")
    t0 = time.perf_counter()
    for i in range(n):
        reg.publish_run(run, f"a{i:04d}")
    return reg, run, time.perf_counter() - t0


def measure(n: int) -> dict:
    from lm.loading import module_names_from_config
    from serve.registry_sync import AdapterSync

    with tempfile.TemporaryDirectory() as tmp:
        reg, run, publish_s = build_registry(Path(tmp), n)
        base = reg.manifest("base", "tiny-llama")
        modules = module_names_from_config(reg.path("base", "tiny-llama"))
        loader = NullLoader()
        sync = AdapterSync(reg, loader, base.base_model["sha256"], modules, max_lora_rank=64)
        t0 = time.perf_counter()
        sync.sync_once()
        startup = time.perf_counter() - t0
        polls = []
        for _ in range(20):
            t0 = time.perf_counter()
            sync.sync_once()
            polls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reg.publish_run(run, "a0000")  # v2 of one name
        sync.sync_once()
        servable = time.perf_counter() - t0
        assert sync.states["a0000"].version != sync.states["a0000@v1"].version
        assert all(s.state == "loaded" for s in sync.states.values()), "every entry must be servable"
        return {"adapters": n, "entries": len(sync.states), "loads": loader.loads,
                "publish_all_s": round(publish_s, 2), "startup_s": round(startup, 3),
                "poll_median_s": round(statistics.median(polls), 4), "poll_max_s": round(max(polls), 4),
                "publish_to_servable_s": round(servable, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000, help="names in the registry (each also pinned as @v1)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    res = measure(args.adapters)
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
