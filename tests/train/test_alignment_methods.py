"""distill, dpo, orpo, grpo and qlora train end to end on the tiny model, publish, and are served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifacts import Manifest, Registry
from tests.conftest import ROOT, tiny_overrides
from train.config import load_config
from train.recipe import run

DEMO = ROOT / "train" / "demo_data"
SCHEMA = DEMO / "chef_answer.schema.json"


def _head(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text().splitlines()[:n]) + "\n")
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("alignment")


@pytest.fixture(scope="module")
def data(work) -> dict[str, dict[str, Path]]:
    return {
        "sft": {"train": _head(DEMO / "chef_train.jsonl", work / "sft.jsonl", 48),
                "eval": _head(DEMO / "chef_heldout.jsonl", work / "sft_eval.jsonl", 6)},
        "pref": {"train": _head(DEMO / "chef_pref_train.jsonl", work / "pref.jsonl", 48),
                 "eval": _head(DEMO / "chef_pref_heldout.jsonl", work / "pref_eval.jsonl", 6)},
        "json": {"train": _head(DEMO / "chef_json_train.jsonl", work / "json.jsonl", 24),
                 "eval": _head(DEMO / "chef_json_heldout.jsonl", work / "json_eval.jsonl", 6)},
    }


def _train(tiny_model, data, out, **extra) -> Path:
    return run(load_config(None, tiny_overrides(tiny_model, data, out, **extra))).root


@pytest.fixture(scope="module")
def teacher(tiny_model, data, work) -> Path:
    """A finished LoRA run used as the distillation teacher (merged in memory)."""
    return _train(tiny_model, data["sft"], work / "teacher", **{"training.lr": 5e-2, "eval.compare_base": False})


CASES = {
    "dpo": ("pref", {"method.name": "dpo"}),
    "orpo": ("pref", {"method.name": "orpo"}),
    "grpo": ("json", {"method.name": "grpo", "method.rewards": f"[json_schema:{SCHEMA},keyword,length:60]",
                      "method.max_completion_length": 6, "training.max_steps": 2}),
    "qlora": ("sft", {"method.name": "qlora"}),
    "distill-offline": ("sft", {"method.name": "distill"}),
    "distill-online": ("sft", {"method.name": "distill", "method.distill_mode": "online"}),
    "distill-gkd": ("sft", {"method.name": "distill", "method.distill_mode": "online", "method.on_policy": 1.0,
                            "method.max_completion_length": 4, "training.max_steps": 2}),
}


@pytest.fixture(scope="module")
def runs(tiny_model, data, work, teacher) -> dict[str, Path]:
    out = {}
    for name, (kind, extra) in CASES.items():
        if extra["method.name"] == "distill":
            extra = {**extra, "method.teacher": str(teacher)}
        out[name] = _train(tiny_model, data[kind], work / name, **extra)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_method_writes_a_verified_adapter_run(runs, name):
    rd = runs[name]
    m = Manifest.read(rd)
    m.verify_files(rd)
    assert m.method == CASES[name][1]["method.name"]
    assert (rd / "adapter" / "adapter_model.safetensors").is_file() and not (rd / "model").exists()
    assert m.servability["vllm"]["ok"] and m.servability["flask"]["ok"], m.servability
    ev = json.loads((rd / "eval.json").read_text())
    logs = [json.loads(x) for x in (rd / "logs" / "metrics.jsonl").read_text().splitlines()]
    if name in ("dpo", "orpo"):
        for side in ("base", "tuned"):
            assert {"preference_accuracy", "preference_margin"} <= set(ev[side])
    if name == "grpo":
        assert {"reward", "reward_json_schema", "reward_keyword", "reward_length"} <= set(ev["tuned"])
        assert any("reward" in r and "kl" in r for r in logs), "reward and KL are logged per step"
    if name in ("distill-offline", "distill-online"):
        assert any("distill_kl" in r and "distill_ce" in r for r in logs)
    if name == "distill-offline":
        meta = json.loads(next((rd / "teacher_cache").glob("*/meta.json")).read_text())
        assert meta["top_k"] == 32 and meta["rows"] > 0 and len(meta["files"]["topk.safetensors"]) == 64


@pytest.mark.slow
def test_every_method_publishes_and_serves(runs, tmp_path):
    """One real server over a registry holding every method's adapter: each answers by name."""
    from tests.serve.conftest import API_KEY, Server, free_port
    from openai import OpenAI

    reg = tmp_path / "registry"
    for name, rd in runs.items():
        Registry(reg).publish_run(rd, name)
    server = Server(reg, {"SERVE_API_KEY": API_KEY, "SERVE_MAX_MODEL_LEN": "256"}, free_port())
    try:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        served = {m.id for m in client.models.list().data}
        assert set(runs) <= served, served
        for name in runs:
            r = client.chat.completions.create(model=name, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "What is in the Korvalo Stew?"}])
            assert r.model == name and r.usage.completion_tokens >= 1
    finally:
        server.stop()


@pytest.mark.slow
def test_half_depth_student_is_a_full_model_and_reuses_the_cache(tiny_model, data, work, teacher, tmp_path, capsys):
    cache = tmp_path / "cache"
    extra = {"method.name": "distill", "method.teacher": str(teacher), "method.student": "full",
             "method.student_layers": "every_other", "method.teacher_cache": str(cache), "training.lr": 1e-2}
    first = _train(tiny_model, data["sft"], tmp_path / "s1", **extra)
    assert "caching the teacher's top-32" in capsys.readouterr().out
    cfg = json.loads((first / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1  # the tiny teacher has 2
    m = Manifest.read(first)
    m.verify_files(first)
    assert m.peft_config is None and (first / "model" / "model.safetensors").is_file()
    _train(tiny_model, data["sft"], tmp_path / "s2", **extra)
    assert "reusing the teacher's top-32" in capsys.readouterr().out
    # A corrupted cache is refused, never silently reused.
    f = next(cache.glob("*/topk.safetensors"))
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    from lm.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher cache checksum mismatch"):
        _train(tiny_model, data["sft"], tmp_path / "s3", **extra)
