"""Bad configs of the new methods exit 2 with one line naming the field, before anything is written."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.conftest import ROOT, refused, tiny_overrides
from train.__main__ import main

DEMO = ROOT / "train" / "demo_data"


def _refused(capsys, argv: list[str], *needles: str) -> str:
    return refused(main, capsys, argv, *needles)


@pytest.fixture
def pref(tmp_path):
    rows = [json.loads(x) for x in (DEMO / "chef_pref_train.jsonl").read_text().splitlines()[:8]]
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_teacher_with_another_tokenizer(tiny_model, small_data, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<menu>", "<dish>"])
    tok.save_pretrained(other)
    out = tmp_path / "run"
    _refused(capsys, tiny_overrides(tiny_model, small_data, out, **{"method.name": "distill", "method.teacher": other}),
             "method.teacher:", "tokenizer differs from the student's", "must share one")
    assert not out.exists()


def test_missing_reward_function(tiny_model, small_data, tmp_path, capsys):
    _refused(capsys, tiny_overrides(tiny_model, small_data, tmp_path / "run",
                                    **{"method.name": "grpo", "method.rewards": "[keyword,mypkg.rewards:score]"}),
             "method.rewards: cannot import 'mypkg.rewards:score': ModuleNotFoundError")


def test_preference_row_without_rejected(tiny_model, small_data, pref, tmp_path, capsys):
    rows = pref.read_text().splitlines()
    bad = json.loads(rows[2])
    del bad["rejected"]
    rows[2] = json.dumps(bad)
    pref.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    _refused(capsys, tiny_overrides(tiny_model, {**small_data, "train": pref}, out, **{"method.name": "dpo"}),
             f"{pref}:3: rejected: missing field")
    assert not out.exists()


def test_dpo_on_chat_data_names_what_it_needs(tiny_model, small_data, tmp_path, capsys):
    _refused(capsys, tiny_overrides(tiny_model, small_data, tmp_path / "run", **{"method.name": "dpo"}),
             "method dpo trains on preference pairs (prompt/chosen/rejected); this file is chat")


def test_qlora_without_bitsandbytes(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    _refused(capsys, tiny_overrides(tiny_model, small_data, tmp_path / "run", **{"method.name": "qlora"}),
             "method.name: qlora needs bitsandbytes", "pip install 'tunestack[qlora]'")


@pytest.mark.parametrize("extra, needle", [
    ({"method.student_layers": "every_other"}, "set method.student=full"),
    ({"method.distill_alpha": 0.5, "method.teacher": None}, "distill needs a teacher"),
    ({"method.on_policy": 0.5}, "only with distill_mode=online"),
    ({"method.student": "full", "method.student_layers": "0,7"}, "indices must lie in 0..1"),
])
def test_distill_config_errors(tiny_model, small_data, tmp_path, capsys, extra, needle):
    extra = {"method.name": "distill", "method.teacher": str(tiny_model), **extra}
    _refused(capsys, tiny_overrides(tiny_model, small_data, tmp_path / "run", **extra), needle)


def test_grpo_batch_must_hold_whole_groups(tiny_model, small_data, tmp_path, capsys):
    _refused(capsys, tiny_overrides(tiny_model, small_data, tmp_path / "run",
                                    **{"method.name": "grpo", "method.num_generations": 3}),
             "must be a multiple of method.num_generations (3)")
