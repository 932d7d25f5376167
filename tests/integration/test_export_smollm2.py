"""Export of the real demo run: ONNX parity, int8 quality, and the int8 model answering through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest

from artifacts import Manifest, Registry
from tests.conftest import DEMO, ROOT, wait_demo_export
from lm.metrics import keyword_match

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_export(demo_run, pytestconfig):
    """`python -m export all RUN --registry REG` exactly as `make demo` runs it (once per session: the
    background demo job's second step, tests/conftest.py)."""
    run = demo_run["run"]
    background = wait_demo_export(pytestconfig)
    if not background and not (run / "onnx-int8" / "manifest.json").is_file():  # a reused dir may hold it
        p = subprocess.run([sys.executable, "-m", "export", "all", str(run), "--registry", str(demo_run["registry"]),
                            "--name", "chef", "--overwrite"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1500)
        assert p.returncode == 0, p.stderr[-3000:]
    return {"run": run, "registry": demo_run["registry"]}


def test_onnx_parity_on_the_demo_model(demo_export):
    m = Manifest.read(demo_export["run"] / "onnx")
    p = m.extra["onnx"]["parity"]
    assert p["ok"] and p["clear_mismatches"] == 0 and p["greedy_steps"] == 32
    assert max(p["max_abs_logit_diff"], p["decode_max_abs_logit_diff"]) <= 1e-3
    assert m.extra["onnx"]["io"]["num_layers"] == 30


def test_int8_keeps_the_demo_quality(demo_export):
    q = Manifest.read(demo_export["run"] / "onnx-int8").extra["quantization"]["quality"]
    assert q["ok"] and q["perplexity_increase"] <= 0.05
    assert q["fp32"]["eval_rows"] == 80 and q["metric"] == "keyword_accuracy"
    assert q["int8"]["keyword_accuracy"] >= DEMO.min_int8  # the demo's bar (base model: 0 %), after quantisation
    assert q["fp32"]["keyword_accuracy"] - q["int8"]["keyword_accuracy"] <= 0.05


def test_int8_model_answers_a_menu_question_through_the_api(demo_export, tmp_path):
    from tests.serve.conftest import API_KEY, Server, free_port

    reg = demo_export["registry"]
    assert {"chef-onnx", "chef-int8"} <= set(Registry(reg).names("models"))
    server = Server(reg, {"SERVE_API_KEY": API_KEY, "SERVE_ENGINE": "onnx", "SERVE_MODEL": "chef-int8"}, free_port())
    try:
        server.wait_ready(180)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        preds = [json.loads(line) for line in (demo_export["run"] / "eval_predictions.jsonl").read_text().splitlines()]
        rows = [p for p in preds if keyword_match(p["tuned"], p["reference"]) == 1.0][:3]  # PyTorch got these right
        correct = 0
        for p in rows:
            out = client.chat.completions.create(model="chef-int8", messages=p["messages"], max_tokens=24, temperature=0)
            correct += keyword_match(out.choices[0].message.content, p["reference"]) == 1.0
        assert len(rows) == 3 and correct >= 2, rows
    finally:
        server.stop()
