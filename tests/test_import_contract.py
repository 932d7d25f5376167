"""The one direction of imports, artifacts <- lm <- {train, export, serve} <- tunestack, checked by import-linter."""

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
    assert "1 kept, 0 broken" in p.stdout


def test_a_stage_importing_another_breaks_it(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "serve" / "leak.py").write_text("from train.recipe import run  # a stage reaching into another\n")
    (tmp_path / "lm" / "upward.py").write_text("import export.quantize  # the core reaching up\n")
    p = lint_imports(tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "BROKEN" in p.stdout and "serve.leak -> train.recipe" in p.stdout and "lm.upward -> export.quantize" in p.stdout
