"""artifacts/finetune_methods.json is what tools/build_finetune_methods.py makes of train's config today."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def test_the_methods_document_is_in_sync_with_the_train_config():
    spec = importlib.util.spec_from_file_location("build_finetune_methods", ROOT / "tools" / "build_finetune_methods.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.OUT.read_text(encoding="utf-8") == tool.render(), "run: python tools/build_finetune_methods.py"
