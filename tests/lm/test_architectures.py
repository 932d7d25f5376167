"""The one list of supported architectures: export and the lean decoder read it, neither keeps its own."""

from __future__ import annotations

import json

import pytest

from export.errors import ExportError
from export.source import SUPPORTED_MODEL_TYPES, check_architecture
from lm.architectures import ARCHITECTURES, read_model_type, supported
from serve.engines import decoder


def test_each_path_reads_the_one_table():
    assert SUPPORTED_MODEL_TYPES == supported("onnx") == tuple(t for t, a in ARCHITECTURES.items() if a.onnx)
    assert decoder.SUPPORTED == supported("lean")
    assert "qwen3" in supported("onnx") and "qwen3" not in supported("lean")  # the old disagreement, now stated


def test_export_refuses_an_unlisted_type_naming_the_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ExportError, match="model_type 'gpt2' is not supported.*llama"):
        check_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert check_architecture(tmp_path) == "qwen3"


def test_read_model_type_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_model_type(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_model_type(tmp_path)


def test_lean_decoder_names_the_reason_for_an_unlisted_type():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(model_type="qwen3"))
    assert "qwen3" in decoder.unsupported(model) and "llama" in decoder.unsupported(model)
