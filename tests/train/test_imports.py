"""The train package's import graph has no circle: the config names the methods and never imports them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT, refused, tiny_overrides
from train.__main__ import main
from train.config import METHOD_NAMES
from train.methods import METHODS

# Prints the import circles of the train package found from sys.path[0], and whether train.config reaches a method.
CIRCLES = """
import json, grimp
g = grimp.build_graph("train")
circles = sorted({tuple(sorted((a, b))) for a in g.modules for b in g.find_modules_directly_imported_by(a)
                  if b in g.modules and g.find_shortest_chain(importer=b, imported=a)})
print(json.dumps({"circles": circles,
                  "config_reaches_methods": g.chain_exists("train.config", "train.methods", as_packages=True)}))
"""


def import_graph(root) -> dict:
    p = subprocess.run([sys.executable, "-c", CIRCLES], cwd=root, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def test_train_has_no_import_circle():
    assert import_graph(ROOT) == {"circles": [], "config_reaches_methods": False}


def test_the_check_sees_a_circle(tmp_path):
    shutil.copytree(ROOT / "train", tmp_path / "train", ignore=shutil.ignore_patterns("__pycache__", "*.jsonl", "*.csv"))
    with open(tmp_path / "train" / "config.py", "a") as f:
        f.write("\n\ndef _table():\n    from train.methods import METHODS  # the import the config used to make\n")
    got = import_graph(tmp_path)
    assert got["config_reaches_methods"] is True
    assert ["train.config", "train.methods"] in got["circles"], got


def test_the_method_table_is_the_configs_list_of_names():
    assert tuple(METHODS) == METHOD_NAMES
    assert all(METHODS[name].name == name for name in METHOD_NAMES)


def test_an_unknown_method_exits_2_with_one_line(tiny_model, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    refused(main, capsys, tiny_overrides(tiny_model, small_data, out, **{"method.name": "lorax"}),
            "method.name: 'lorax' unknown; choose from lora, dora, ia3, prompt_tuning, full, qlora, distill, dpo, orpo, grpo")
    assert not out.exists()
