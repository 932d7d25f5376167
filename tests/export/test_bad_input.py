"""Every refused input: exit code 2, one line naming the file and the reason, and no output written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.__main__ import main
from tests.conftest import refused
from tunestack.cli import main as tunestack_main


def _refused(capsys, argv: list[str], *needles: str) -> str:
    return refused(main, capsys, argv, *needles)


@pytest.mark.parametrize("cmd", ["merge", "onnx"])
def test_missing_run(cmd, tmp_path, capsys):
    _refused(capsys, [cmd, str(tmp_path / "nope")], str(tmp_path / "nope"), "no such run")
    assert list(tmp_path.iterdir()) == []


def test_adapter_on_a_different_base(tiny_run, tiny_model, tmp_path, capsys):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # same shapes, different model: the checksum must tell them apart
    (other / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    _refused(capsys, ["merge", str(tiny_run), "--base", str(other), "--out", str(out)],
             str(other), "does not match the adapter's base")
    assert not out.exists()


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    capsys.readouterr()  # the save's own progress bar is not the CLI's output
    _refused(capsys, ["onnx", str(folder)], f"{folder}/config.json", "model_type 'gpt2' is not supported")
    assert not (tmp_path / "gpt2-onnx").exists()


def test_existing_output_without_overwrite(exported, capsys):
    before = (exported["onnx"] / "model.onnx").stat().st_mtime_ns
    _refused(capsys, ["onnx", str(exported["run"])], str(exported["onnx"]), "exists; pass --overwrite")
    _refused(capsys, ["merge", str(exported["run"])], str(exported["model"]), "exists; pass --overwrite")
    _refused(capsys, ["quantize", str(exported["onnx"]), "--out", str(exported["int8"])], "exists; pass --overwrite")
    assert (exported["onnx"] / "model.onnx").stat().st_mtime_ns == before


def test_corrupt_weight_file(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model", "onnx*", "checkpoints"))
    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    _refused(capsys, ["merge", str(run)], str(weights), "sha256 does not match")
    assert not (run / "model").exists()


def test_corrupt_export_is_not_published(exported, tmp_path, capsys):
    copy = tmp_path / "onnx"
    shutil.copytree(exported["onnx"], copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    refused(tunestack_main, capsys, ["registry", "publish", str(copy), "--registry", str(tmp_path / "reg"), "--name", "x"],
            "sha256 does not match")
    assert not (tmp_path / "reg" / "models" / "x").exists()


def test_run_without_merged_model_asks_for_merge(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model", "onnx*", "checkpoints"))
    _refused(capsys, ["onnx", str(run)], "tunestack export merge")
    assert not (run / "onnx").exists()


def test_quantize_needs_an_fp32_onnx_export(exported, tmp_path, capsys):
    _refused(capsys, ["quantize", str(exported["int8"]), "--out", str(tmp_path / "q")], "quantize takes an fp32")
    assert not Path(tmp_path / "q").exists()


def test_prompt_tuning_cannot_be_merged(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model", "onnx*", "checkpoints"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["method"] = "prompt_tuning"  # the manifest is not in its own checksum list
    (run / "manifest.json").write_text(json.dumps(manifest))
    _refused(capsys, ["merge", str(run)], "prompt tuning", "cannot be merged")
    assert not (run / "model").exists()
