"""The one direction of imports, artifacts <- lm <- {train, export, serve} <- tunestack, and the layers inside
serve (entry point -> backends -> HTTP -> API logic -> engines -> kernel), checked by import-linter."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("artifacts", "lm", "train", "export", "serve", "tunestack")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          timeout=300)


def test_contract_is_kept_with_no_ignored_imports():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert all("ignore_imports" not in c for c in cfg["contracts"])
    assert cfg["contracts"][0]["layers"] == ["tunestack", "train | export | serve", "lm", "artifacts"]
    p = lint_imports(ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 kept, 0 broken" in p.stdout
    serve_layers = cfg["contracts"][1]
    assert serve_layers["containers"] == ["serve"] and serve_layers["layers"][0] == "__main__"
    layered = {m.strip() for layer in serve_layers["layers"] for m in layer.split("|")}
    # every subpackage and module of serve sits in a layer: a new one must be placed, not left unchecked
    present = {p.stem for p in (ROOT / "serve").iterdir()
               if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert present == layered, (present ^ layered)


def test_a_stage_importing_another_or_a_serve_layer_reaching_up_breaks_it(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "serve" / "leak.py").write_text("from train.recipe import run  # a stage reaching into another\n")
    (tmp_path / "lm" / "upward.py").write_text("import export.quantize  # the core reaching up\n")
    (tmp_path / "serve" / "engines" / "upward.py").write_text("from serve.http.app import build_app  # an engine reaching the HTTP layer\n")
    (tmp_path / "serve" / "finetune" / "infer.py").write_text("from serve.engines.base import SamplingParams  # the API needing an engine\n")
    with open(tmp_path / "train" / "config.py", "a") as f:
        f.write("\n\ndef _table():\n    from train.methods import METHODS  # the config importing the methods\n")
    p = lint_imports(tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "BROKEN" in p.stdout and "serve.leak -> train.recipe" in p.stdout and "lm.upward -> export.quantize" in p.stdout
    assert "serve.engines.upward -> serve.http.app" in p.stdout, p.stdout
    assert "serve.finetune.infer -> serve.engines.base" in p.stdout, p.stdout
    assert "train.config -> train.methods" in p.stdout, p.stdout
    assert "0 kept, 4 broken" in p.stdout, p.stdout  # each contract caught its own breach
