"""TensorRT: argument checks, optimisation profiles and the missing-TensorRT path run everywhere; the
engine build itself only where TensorRT and a GPU exist (skipped with that reason otherwise)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from artifacts import Manifest
from export.__main__ import main
from export.errors import ExportError
from export.tensorrt import BuildArgs, build_engine, profiles

IO = {"num_key_value_heads": 3, "head_dim": 64, "past_inputs": ["past_key_values.0.key", "past_key_values.0.value"]}


def test_profiles_cover_prefill_and_decode():
    p = profiles(BuildArgs(max_batch=8, max_seq=512, opt_batch=4, opt_seq=128), IO)
    pre, dec = p["prefill"], p["decode"]
    assert pre["input_ids"] == ((1, 1), (4, 128), (8, 512))
    assert pre["past_key_values.0.key"] == ((1, 3, 0, 64), (4, 3, 0, 64), (8, 3, 0, 64))  # no past in a prefill
    assert dec["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert dec["past_key_values.0.value"] == ((1, 3, 1, 64), (4, 3, 128, 64), (8, 3, 511, 64))
    assert dec["attention_mask"] == ((1, 2), (4, 129), (8, 512))  # past + the new token, never beyond max_seq
    for shape in (pre, dec):
        for lo, opt, hi in shape.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


@pytest.mark.parametrize("args, message", [
    (BuildArgs(precision="int4"), "--precision"),
    (BuildArgs(max_batch=0), "--max-batch"),
    (BuildArgs(opt_batch=16, max_batch=8), "--opt-batch 16 exceeds"),
    (BuildArgs(opt_seq=4096, max_seq=1024), "--opt-seq 4096 exceeds"),
    (BuildArgs(max_seq=1), "--max-seq must be >= 2"),
])
def test_bad_build_arguments(args, message):
    with pytest.raises(ExportError, match=message):
        args.check()


def test_max_seq_beyond_the_model_is_refused(exported, tmp_path, capsys):
    assert main(["tensorrt", str(exported["onnx"]), "--max-seq", "100000", "--out", str(tmp_path / "e")]) == 2
    assert "max_position_embeddings 512" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present: the build test below runs instead")
def test_missing_tensorrt_exits_3_with_the_reason(exported, tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["tensorrt", str(exported["onnx"]), "--max-seq", "256", "--opt-seq", "64", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err or "no CUDA GPU" in err
    assert not out.exists()


_MISSING = [why for why, missing in (("tensorrt is not installed", importlib.util.find_spec("tensorrt") is None),
                                    ("no CUDA GPU", not torch.cuda.is_available())) if missing]


@pytest.mark.skipif(bool(_MISSING), reason=" and ".join(_MISSING) + " on this machine")
def test_builds_an_engine(exported, tmp_path):
    res = build_engine(exported["onnx"], tmp_path / "engine", BuildArgs(max_batch=2, max_seq=256, opt_batch=1, opt_seq=64))
    m = Manifest.read(res["path"])
    m.verify_files(res["path"])
    assert m.method == "tensorrt" and set(m.extra["tensorrt"]["profiles"]) == {"prefill", "decode"}
