"""`torchrun` on a CPU (gloo): the recipe under DDP, with the fused step and DDP's static graph (the defaults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_process_ddp_run_trains_with_the_fused_step(tiny_model, small_data, tmp_path, method):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model, small_data, out, **{"method.name": method, "training.fast_path": "on",
                                                           "training.batch_size": 2, "eval.enabled": "false"})
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("fast path: padding-free batches") == 2, p.stdout[-2000:]  # both ranks run the fused step
    logs = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses), losses  # rank 0 alone logs, once a step
    rows = json.loads((out / "data_report.json").read_text())["tokens"]["train"]["rows"]
    epoch = next(r["epoch"] for r in logs if r["step"] == 4)
    assert epoch == pytest.approx(4 * 2 * 2 / rows, rel=0.1)  # 2 ranks x 2 rows a step: each rank takes its share
    man = json.loads((out / "manifest.json").read_text())
    assert man["files"]
