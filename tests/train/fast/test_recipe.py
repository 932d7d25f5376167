"""`python -m train` on the fused step: same losses as the transformers forward, same artifacts, resume, the bench."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from artifacts import Manifest
from lm.loading import load_model
from tests.conftest import ROOT, tiny_overrides
from train.config import load_config
from train.fast.install import install
from train.methods import get_method
from train.recipe import run


def _losses(rd) -> list[float]:
    return [r["loss"] for r in map(json.loads, rd.metrics_log.read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_step_trains_the_same_curve_and_artifacts(method, tiny_model, small_data, tmp_path, capsys):
    runs = {}
    for mode in ("off", "on"):
        cfg = load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / mode, **{
            "method.name": method, "method.dropout": 0.0, "training.fast_path": mode, "training.max_steps": 6,
            "eval.retention": "false"}))
        runs[mode] = run(cfg)
    out = capsys.readouterr().out
    assert out.count("fast path: padding-free batches, SDPA per document attention") == 1
    off, on = _losses(runs["off"]), _losses(runs["on"])
    assert len(on) == len(off) == 6
    # same batches, same optimiser: the same curve (full fine-tuning at lr 1e-3 amplifies fp32 rounding a little)
    assert on == pytest.approx(off, rel=1e-3), (off, on)
    ev_on, ev_off = (json.loads(runs[m].eval.read_text()) for m in ("on", "off"))
    # Adam turns rounding-level gradient differences of near-zero elements into whole steps: full fine-tuning
    # drifts by ~0.1 % in 6 steps at this rate, LoRA far less
    assert ev_on["tuned"]["val_loss"] == pytest.approx(ev_off["tuned"]["val_loss"], rel=5e-3 if method == "full" else 1e-3)
    m = Manifest.read(runs["on"].root)
    m.verify_files(runs["on"].root)
    if method == "lora":
        assert m.servability["vllm"]["ok"], m.servability  # a plain peft adapter, servable as before
    else:
        assert (runs["on"].model / "model.safetensors").is_file()


def test_fused_step_resumes_from_its_checkpoint(tiny_model, small_data, tmp_path):
    args = tiny_overrides(tiny_model, small_data, tmp_path / "r", **{
        "method.dropout": 0.0, "training.fast_path": "on", "training.max_steps": 4, "eval.enabled": "false",
        "training.lr_scheduler": "constant", "training.warmup_ratio": 0})
    whole = run(load_config(None, [*args, f"output.dir={tmp_path / 'whole'}"]))
    cut = load_config(None, [*args, "training.max_steps=2"])
    run(cut)  # a finished 2-step run has checkpoint-2; continue it to 4 steps
    (tmp_path / "r" / "manifest.json").unlink()
    resumed = run(load_config(None, args), resume=True)
    assert _losses(resumed)[-1] == pytest.approx(_losses(whole)[-1], rel=1e-4)


def test_models_it_does_not_cover_train_on_the_transformers_forward(tiny_model, small_data, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "d", **{
        "method.name": "lora", "training.fast_path": "on", "training.fsdp": "full_shard auto_wrap",
        "training.max_steps": 1, "eval.enabled": "false"}))
    model = get_method("lora", cfg.method).prepare(load_model(str(tiny_model), torch.float32), cfg.method)
    assert install(model, cfg) is None
    assert "fast path off: FSDP" in capsys.readouterr().out


@pytest.mark.slow
def test_speed_bench_runs_at_tiny_size_and_both_arms_agree(tmp_path):
    p = subprocess.run([sys.executable, "bench/train_speed.py", "--tiny", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "train_speed.json").read_text())["results"]
    assert [(r["method"], r["data"]) for r in res] == [("lora", "var"), ("full", "var")]
    for r in res:
        b, f = r["baseline"], r["project"]
        assert len(b["tokens_per_s"]) == len(f["tokens_per_s"]) == 2 and min(b["tokens_per_s"] + f["tokens_per_s"]) > 0
        # the same batches in the same order, fp32 on CPU: the two loss curves coincide
        assert f["losses"] == pytest.approx(b["losses"], rel=1e-3)
        assert 0 < r["padding_share_baseline"] < 1
    assert (tmp_path / "out" / "train_speed_loss.png").stat().st_size > 10_000
    assert "| tiny lora var | project |" in p.stdout


def test_fair_bench_runs_at_tiny_size_with_five_windows_and_both_arms_agree(tmp_path):
    """bench/train_fair.py (issue 29's fair baseline): fixed-length and variable-length data, median + spread."""
    p = subprocess.run([sys.executable, "bench/train_fair.py", "--tiny", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "train_fair.json").read_text())["results"]
    assert [(r["method"], r["data"]) for r in res] == [("lora", "4x96"), ("full", "4x96"), ("lora", "var")]
    for r in res:
        for arm in (r["baseline"], r["project"]):
            assert len(arm["tokens_per_s"]) == 5 and min(arm["tokens_per_s"]) > 0
            assert arm["tps"]["min"] <= arm["tps"]["median"] <= arm["tps"]["max"]
        # the same batches in the same order, fp32 on CPU: the two loss curves coincide
        assert r["project"]["losses"] == pytest.approx(r["baseline"]["losses"], rel=1e-3)
    assert res[0]["tokens_per_step"] == {"median": 384, "min": 384, "max": 384}  # 4 rows of exactly 96 tokens
    assert res[0]["padding_share_baseline"] == 0 and 0 < res[2]["padding_share_baseline"] < 1
    assert "| tiny lora 4x96 |" in p.stdout and "project LoRA / project full" in p.stdout
