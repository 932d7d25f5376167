"""Output-dir safety, early stopping, checkpoints and --resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from artifacts import RunDir
from tests.conftest import ROOT, run_train_cli, tiny_overrides
from train.__main__ import main
from train.config import load_config
from train.recipe import run


def test_existing_output_dir_is_refused(tiny_model, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(tiny_overrides(tiny_model, small_data, out)) == 2
    assert "output.dir exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_early_stopping_stops_when_val_loss_stalls(tiny_model, small_data, tmp_path):
    # lr so small the validation loss cannot improve: patience 2 must stop the run long before max_steps.
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r", **{
        "training.max_steps": 60, "training.lr": 1e-12, "training.eval_steps": 1,
        "training.early_stopping_patience": 2, "eval.enabled": False}))
    rd = run(cfg)
    ev = json.loads(rd.eval.read_text())
    assert ev["train_steps"] <= 5, ev


@pytest.mark.slow  # ~40 s: trains 600 real steps around a kill
def test_resume_after_kill(tiny_model, small_data, tmp_path):
    out = tmp_path / "r"
    args = tiny_overrides(tiny_model, small_data, out, **{"training.max_steps": 600, "training.save_steps": 10,
                                                          "training.eval_steps": 600, "training.batch_size": 2,
                                                          "eval.enabled": False})
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    rd = RunDir(out)
    deadline = time.time() + 300
    while time.time() < deadline and rd.last_checkpoint() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint finish writing, then crash hard
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = rd.last_checkpoint()
    assert ck is not None and not rd.is_finished() and not rd.adapter.exists()
    done_step = int(ck.name.split("-")[1])
    assert done_step < 600
    partial = rd.checkpoints / f"checkpoint-{done_step + 5}"  # a save cut short by the kill: no trainer_state.json
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert rd.last_checkpoint() == ck

    p = run_train_cli(*args, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert rd.is_finished()
    ev = json.loads(rd.eval.read_text())
    assert ev["train_steps"] == 600
    logged = [json.loads(line)["step"] for line in rd.metrics_log.read_text().splitlines()]
    assert max(logged) == 600 and (done_step + 1) in logged

    again = run_train_cli(*args, "--resume")
    assert again.returncode == 2 and "already finished" in again.stderr
