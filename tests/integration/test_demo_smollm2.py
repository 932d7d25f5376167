"""The README's demo on the real SmolLM2-135M-Instruct: gain, reload, merge, publish. Runs once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from artifacts import Manifest, Registry
from tests.conftest import DEMO, ROOT

pytestmark = pytest.mark.slow


def test_demo_gain_on_heldout_phrasings(demo_run):
    ev = json.loads((demo_run["run"] / "eval.json").read_text())
    h = ev["headline"]
    print(f"\ndemo: {h['metric']} base {100 * h['base']:.1f} -> tuned {100 * h['tuned']:.1f} "
          f"({h['gain_points']:+.1f} points, {h['eval_rows']} held-out rows, {ev['train_seconds']:.0f} s)")
    assert h["eval_rows"] == 80
    assert h["gain_points"] >= DEMO.min_gain_points, h
    assert ev["tuned"]["val_loss"] < ev["base"]["val_loss"]
    assert "points" in demo_run["stdout"]


def test_adapter_reloads_with_plain_peft_and_same_greedy_output(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    man = Manifest.read(demo_run["run"])
    base_path = man.base_model["path"]
    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(demo_run["run"] / "adapter")).eval()
    rows = [json.loads(line) for line in (demo_run["run"] / "eval_predictions.jsonl").read_text().splitlines()][:24]
    for r in rows:  # one at a time, no padding: an independent path from the batched training-time eval
        ids = tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == r["tuned"], r["where"]


def test_merged_model_equals_base_plus_adapter(demo_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    p = subprocess.run([sys.executable, "-m", "export", "merge", str(demo_run["run"]), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    base_path = Manifest.read(demo_run["run"]).base_model["path"]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # base+adapter evaluated in float64: the exact logits the fp32 merged model must reproduce.
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                    str(demo_run["run"] / "adapter")).to(torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for q in ("How spicy is Korvalo Stew?", "Could you tell me what the Brintel Tart costs?"):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            diff = (merged(input_ids=ids).logits.double() - ref(input_ids=ids).logits).abs().max().item()
        assert diff <= 5e-4, diff  # fp32 rounding of the merged weights (1.1e-4 measured); a wrong merge is >= 1e-2 off
    assert merged.dtype == torch.float32
    assert not any(f.suffix in (".bin", ".pt", ".pth") for f in out.iterdir())
    again = subprocess.run([sys.executable, "-m", "export", "merge", str(demo_run["run"]), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_demo_published_to_registry(demo_run):
    reg = Registry(demo_run["registry"])
    assert reg.adapters() == ["chef"]
    m = reg.verify("adapters", "chef")
    assert m.servability["vllm"] == {"ok": True, "reasons": [], "max_lora_rank": 16, "rank": 16}
    name, base = reg.base()
    assert name == "SmolLM2-135M-Instruct" and (base / "model.safetensors").is_file()
    reg.verify("base", name)


def test_train_eval_command_rescores_the_run(demo_run, tmp_path):
    out = tmp_path / "rescore.json"
    p = subprocess.run([sys.executable, "-m", "train", "eval", "--run", str(demo_run["run"]), "--data",
                        "train/demo_data/chef_heldout.jsonl", "--max-new-tokens", "16", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    rescored = json.loads(out.read_text())
    ev = json.loads((demo_run["run"] / "eval.json").read_text())
    assert rescored["keyword_accuracy"] == pytest.approx(ev["tuned"]["keyword_accuracy"], abs=0.02)
