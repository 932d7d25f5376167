"""training.report_to: TensorBoard, a real local `mlflow server` and W&B (offline) get the step metrics and the
evaluation (task, retention by category, KL, the gate's verdict) of the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from artifacts.gate import check
from tests.conftest import refused, tiny_overrides
from train import tracking
from train.__main__ import main
from train.config import Config, load_config
from train.recipe import run

# The server runs from its own venv (`make` builds it): mlflow's server pins python-dateutil<3 (graphene), the
# k8s extra's kubernetes client needs >=3, so the two cannot share .venv; the trainer needs only the client.
MLFLOW_SERVER = Path(sys.prefix) / "mlflow-server" / "bin" / "mlflow"
EXPERIMENT = "tunestack-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"mlflow server exited {proc.returncode}: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server not healthy in {deadline_s} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port: sqlite backend, a local artifact dir; killed at the end of the module."""
    assert MLFLOW_SERVER.is_file(), f"{MLFLOW_SERVER} missing: `make test` builds the MLflow server's venv (.venv/mlflow-server)"
    d = tmp_path_factory.mktemp("mlflow")
    port, log = _free_port(), d / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(MLFLOW_SERVER), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                                 "--artifacts-destination", str(d / "artifacts")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:  # the server's own workers are in its session: end them all
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tiny_model, tmp_path_factory):
    """One tiny run reporting to all three trackers; W&B offline (its own WANDB_MODE), MLflow to the server."""
    from tests.conftest import DEMO_HELDOUT, DEMO_TRAIN

    d = tmp_path_factory.mktemp("tracked")
    data = {"train": d / "train.jsonl", "eval": d / "eval.jsonl"}
    data["train"].write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:64]) + "\n")
    data["eval"].write_text("\n".join(DEMO_HELDOUT.read_text().splitlines()[:8]) + "\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        cfg = load_config(None, tiny_overrides(tiny_model, data, d / "run", **{
            "training.report_to": "tensorboard,mlflow,wandb", "tracking.mlflow_uri": mlflow_server,
            "tracking.experiment": EXPERIMENT, "tracking.run_name": "tiny-tracked",
            "eval.max_examples": 4, "eval.retain_max_examples": 4}))
        rd = run(cfg)
    finally:
        mp.undo()
    return {"rd": rd, "cfg": cfg, "eval": json.loads(rd.eval.read_text()), "url": mlflow_server,
            "refs": json.loads((rd.logs / "tracking.json").read_text())}


def _expected(tr) -> dict[str, float]:
    """The figures eval.json holds, under the trackers' names; the gate measured as publish would."""
    ev = tr["eval"]
    from artifacts import Manifest

    gate = check(Manifest.read(tr["rd"].root).metrics, tr["cfg"].publish.policy())
    want = {"task/base": ev["headline"]["base"], "task/tuned": ev["headline"]["tuned"],
            "task/gain_points": ev["headline"]["gain_points"], "retention/base": ev["retention"]["base"],
            "retention/tuned": ev["retention"]["tuned"], "retention/drop_points": ev["retention"]["drop_points"],
            "gate/passed": float(gate.passed), "gate/forced": 0.0}
    if ev["retention"]["kl"] is not None:  # None where the tiny base answers nothing (no tokens to compare)
        want["retention/kl"] = ev["retention"]["kl"]
    for cat, v in ev["retention"]["by_category"].items():
        want |= {f"retention/{cat}/base": v["base"], f"retention/{cat}/tuned": v["tuned"]}
    assert ev["retention"]["by_category"], ev["retention"]
    return want


@pytest.mark.slow
def test_mlflow_server_holds_params_step_loss_and_the_evaluation(tracked_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracked_run["url"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [tracked_run["refs"]["mlflow"]["run_id"]]
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "tiny-tracked"
    p = r.data.params
    assert (p["training.lr"], p["method.name"], p["method.r"]) == ("0.001", "lora", "4"), p
    assert p["learning_rate"] == "0.001"  # transformers' MLflowCallback logged the TrainingArguments into the same run
    loss = client.get_metric_history(r.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4], loss  # logging_steps=1, max_steps=4
    assert all(m.value > 0 for m in loss)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "eval_loss")] == [2, 4]
    for name, value in _expected(tracked_run).items():
        assert r.data.metrics[name] == pytest.approx(value), name
    assert r.data.tags["gate.passed"] in ("true", "false") and r.data.tags["gate.reasons"]


def _wandb_records(path: Path):
    """The records of a W&B offline run file (run-ID.wandb): wandb's LevelDB-style log of its own protobuf Records,
    which wandb-core writes and `wandb sync` uploads; 0.31 has no Python reader, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:
            break
        buf = data[pos + header:pos + header + length] if kind in (1, 2) else buf + data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def _wandb_items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


@pytest.mark.slow
def test_wandb_offline_run_holds_the_loss_and_the_evaluation(tracked_run):
    runs = list((tracked_run["rd"].logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (path,) = runs[0].glob("run-*.wandb")
    assert path.name == f"run-{tracked_run['refs']['wandb']['run_id']}.wandb"
    history, summary, config = [], {}, {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append(_wandb_items(r.history.item))
        elif kind == "summary":
            summary |= _wandb_items(r.summary.update)
        elif kind in ("run", "config"):  # the run record carries wandb.init's config, config records the updates
            config |= _wandb_items((r.run.config if kind == "run" else r.config).update)
    loss = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [s for s, _ in loss] == [1, 2, 3, 4] and all(v > 0 for _, v in loss), history
    for name, value in _expected(tracked_run).items():
        assert summary[name] == pytest.approx(value), name
    assert summary["gate.passed"] in ("true", "false")
    assert (config["training"]["lr"], config["method"]["name"], config["method"]["r"]) == (0.001, "lora", 4), config
    assert config["learning_rate"] == 0.001  # transformers' WandbCallback added the TrainingArguments to the same run


@pytest.mark.slow
def test_tensorboard_gets_the_evaluation_beside_the_loss(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run["rd"].tensorboard)).Reload()
    assert len(acc.Scalars("train/loss")) == 4
    for name, value in _expected(tracked_run).items():
        (point,) = acc.Scalars(name)
        assert (point.step, point.value) == (4, pytest.approx(value, rel=1e-6)), name


@pytest.mark.parametrize("value", ["comet", "tensorboard,comet", "none,mlflow", "[]"])
def test_a_bad_report_to_exits_2_with_one_line(value, tmp_path, capsys):
    refused(main, capsys, [f"training.report_to={value}", f"output.dir={tmp_path / 'r'}"],
            "training.report_to", "tensorboard, mlflow, wandb", "none")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value, want", [("MLflow, tensorboard", ["mlflow", "tensorboard"]), ("none", ["none"]),
                                         ("[wandb, wandb]", ["wandb"])])
def test_report_to_takes_a_list_or_a_comma_string(value, want):
    assert load_config(None, [f"training.report_to={value}"]).training.report_to == want
    assert Config().training.report_to == ["tensorboard"]  # today's default stays


def test_mlflow_without_its_client_exits_2_naming_the_extra(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError, as when not installed
    refused(main, capsys, tiny_overrides(tiny_model, small_data, tmp_path / "r", **{"training.report_to": "mlflow"}),
            "training.report_to", "mlflow", "pip install 'tunestack[tracking]'")
    assert not (tmp_path / "r").exists()


def test_mlflow_without_a_server_exits_2_before_any_write(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    refused(main, capsys, tiny_overrides(tiny_model, small_data, tmp_path / "r", **{"training.report_to": "mlflow"}),
            "training.report_to", "tracking.mlflow_uri", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "r").exists()


def test_an_unreachable_mlflow_server_exits_2_with_one_line(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own setting: fail at once, not after backoff
    assert main(tiny_overrides(tiny_model, small_data, tmp_path / "r", **{
        "training.report_to": "tensorboard,mlflow", "tracking.mlflow_uri": f"http://127.0.0.1:{_free_port()}"})) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # the model's loading bars came first: the error is one line
    assert "training.report_to: mlflow: its run did not start" in err and "/api/2.0/mlflow/" in err, err


def test_evaluation_metrics_name_every_figure_once():
    ev = {"base": {"keyword_accuracy": 0.1, "eval_rows": 8}, "tuned": {"keyword_accuracy": 0.5, "eval_rows": 8},
          "headline": {"metric": "keyword_accuracy", "base": 0.1, "tuned": 0.5, "gain_points": 40.0},
          "retention": {"base": 0.5, "tuned": 0.25, "drop_points": 25.0, "kl": 0.125,
                        "by_category": {"facts": {"base": 1.0, "tuned": 0.5, "rows": 2}}}}
    gate = check({"headline": ev["headline"], "retention": ev["retention"]}, Config().publish.policy())
    m = tracking.evaluation_metrics(ev, gate)
    assert m == {"eval/base/keyword_accuracy": 0.1, "eval/base/eval_rows": 8.0, "eval/tuned/keyword_accuracy": 0.5,
                 "eval/tuned/eval_rows": 8.0, "task/base": 0.1, "task/tuned": 0.5, "task/gain_points": 40.0,
                 "retention/base": 0.5, "retention/tuned": 0.25, "retention/drop_points": 25.0, "retention/kl": 0.125,
                 "retention/facts/base": 1.0, "retention/facts/tuned": 0.5, "gate/passed": 0.0, "gate/forced": 0.0}
    assert tracking.gate_tags(ev, gate)["gate.reasons"] == "retention dropped more than max_retention_drop"
