"""The dev-only generators in tools/ still rebuild the bundled data byte for byte (they live outside the package)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.conftest import ROOT


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # the generators run as scripts: python tools/X.py


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_general_sets_rebuild_identically(tools):
    import build_general_sets as g

    retain, replay = g.build()
    assert g.OUT == ROOT / "lm" / "general"
    assert _jsonl(retain) == (g.OUT / "retain.jsonl").read_text(encoding="utf-8")
    assert _jsonl(replay) == (g.OUT / "replay_prompts.jsonl").read_text(encoding="utf-8")


def test_demo_data_rebuilds_identically(tools):
    import build_demo_alignment as a
    import build_demo_chef as c

    d = c.DEMO_DATA
    train, heldout = c.build()
    assert _jsonl(train) == (d / "chef_train.jsonl").read_text(encoding="utf-8")
    assert _jsonl(heldout) == (d / "chef_heldout.jsonl").read_text(encoding="utf-8")
    spice_train, _ = c.build_classification()
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(spice_train)
    assert buf.getvalue() == (d / "menu_spice_train.csv").read_bytes().decode("utf-8")
    pref_train, _ = a.build_preference()
    json_train, _ = a.build_json_task()
    assert _jsonl(pref_train) == (d / "chef_pref_train.jsonl").read_text(encoding="utf-8")
    assert _jsonl(json_train) == (d / "chef_json_train.jsonl").read_text(encoding="utf-8")
    assert json.loads((d / "chef_answer.schema.json").read_text()) == a.JSON_SCHEMA
