"""`python -m train` on the real SmolLM2 for the integration tests: CI size unless --full."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
import tests.conftest as suite


def train(config: str, out: Path, *overrides: str, ci: tuple[str, ...] = ()) -> dict:
    """python -m train CONFIG; CI-size overrides unless --full. Returns eval.json."""
    # At CI size these runs measure their own method, not retention (the demo run and test_retention_smollm2 do).
    args = [sys.executable, "-m", "train", config, f"output.dir={out}", "output.registry=null",
            *overrides, *(() if suite.FULL else (*ci, "eval.retention=false"))]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3000,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())
