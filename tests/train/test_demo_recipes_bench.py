"""bench/demo_recipes.py's logic (issue 27): the seeds summary, the bars, early stopping on retention, the
length-grouped batches, the replay draw and the paraphrase augmentation. No model: the figures are made up."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("demo_recipes", ROOT / "bench" / "demo_recipes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


BASE = {"retention": {c: {"overall": 0.5, "by_category": {"arithmetic": 0.4, "facts": 0.6, "chat": 0.0}}
                      for c in ("no_system", "train_system")}}


def scores(arith: float, facts: float, heldout: float) -> dict:
    ret = {c: {"overall": (arith + facts) / 2, "by_category": {"arithmetic": arith, "facts": facts, "chat": 0.0}}
           for c in ("no_system", "train_system")}
    return {"heldout": heldout, "retention": ret}


def checkpoint(bench, step: int, arith: float, facts: float, heldout: float) -> dict:
    s = scores(arith, facts, heldout)
    return {"step": step, "tokens": 100 * step, "kl": 0.1, **s, "ratios": bench.ratios(s, BASE)}


def test_ratios_name_the_worst_category_and_skip_what_the_base_never_knew(bench):
    r = bench.ratios(scores(0.1, 0.6, 0.9), BASE)["no_system"]
    assert r["worst_category"] == "arithmetic" and r["worst_ratio"] == pytest.approx(0.25)
    assert r["overall"] == pytest.approx(0.7) and "chat" not in r["by_category"]


def test_summary_is_mean_and_sd_over_seeds_and_every_seed_must_meet_the_bars(bench):
    runs = [{"seed": s, "checkpoints": [checkpoint(bench, 246, 0.4, 0.6, h)]} for s, h in enumerate((0.95, 0.9, 0.86))]
    out = bench.summarize("today", runs, early_stop=False)
    assert out["heldout"]["mean"] == pytest.approx(0.9033, abs=1e-3) and out["heldout"]["sd"] == pytest.approx(0.045, abs=1e-3)
    assert out["bars"]["heldout_mean_ge_90"] and out["bars"]["every_seed_ge_85"] and out["bars"]["retention_every_seed_meets"]
    runs[2]["checkpoints"][0] = checkpoint(bench, 246, 0.3, 0.6, 0.84)  # one seed below 85 % and arithmetic at 75 %
    out = bench.summarize("today", runs, early_stop=False)
    assert not out["bars"]["every_seed_ge_85"] and not out["bars"]["retention_every_seed_meets"]
    assert out["conditions"]["no_system"]["worst_categories"][2] == "arithmetic"


def test_early_stopping_takes_the_latest_checkpoint_that_keeps_retention(bench):
    cps = [checkpoint(bench, 164, 0.4, 0.6, 0.8), checkpoint(bench, 205, 0.38, 0.6, 0.88),
           checkpoint(bench, 246, 0.2, 0.6, 0.93)]
    assert bench.chosen({"checkpoints": cps}, early_stop=True)["step"] == 205
    assert bench.chosen({"checkpoints": cps}, early_stop=False)["step"] == 246
    worse = [checkpoint(bench, 164, 0.2, 0.6, 0.8), checkpoint(bench, 246, 0.1, 0.6, 0.9)]
    assert bench.chosen({"checkpoints": worse}, early_stop=True)["step"] == 164  # none meets: the best retention


def test_length_grouped_batches_cover_every_row_once_longest_first(bench):
    lengths = [random.Random(1).randint(5, 200) for _ in range(650)]
    out = bench.batches(lengths, 8, random.Random(0))
    assert sorted(i for b in out for i in b) == list(range(650)) and len(out) == 82
    assert lengths[out[0][0]] == max(lengths)
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in out)


def test_replay_draw_matches_train_replay_and_a_mix_follows_its_shares(bench):
    rows = [{"prompt": f"p{i}", "answer": "a", "where": f"f:{i}", "category": c}
            for i, c in enumerate(["arithmetic"] * 80 + ["facts"] * 90 + ["chat"] * 25)]
    bench.S["replay_rows"] = rows
    uniform = bench.replay_examples(bench.RECIPES["today"], 570, 3, "SYS")
    assert [e.where for e in uniform] == [f"replay:{r['where']}" for r in random.Random(3).sample(rows, 86)]
    assert sum(e.messages[0]["role"] == "system" for e in uniform) == 43  # every other row, as train/replay.py
    mixed = bench.replay_examples(bench.replace(bench.RECIPES["today"], mix={"arithmetic": 0.5, "facts": 0.5},
                                                replay_system="none"), 100, 0, "SYS")
    assert sum(int(e.where.split(":")[-1]) < 80 for e in mixed) == 8 and len(mixed) == 16
    assert all(e.messages[0]["role"] == "user" for e in mixed)


def test_paraphrase_keeps_the_fact_and_changes_the_question(bench):
    from lm.data.prepare import prepare
    from lm.data.config import DataConfig
    train = prepare(DataConfig(train=str(bench.DEMO / "chef_train.jsonl"), eval=None), 0).train
    dishes = sorted({d for ex in train for d in bench.dishes_in(ex.messages[-2]["content"])})
    assert len(dishes) == 25
    rng = random.Random(0)
    for ex in train[:40]:
        new = bench.paraphrased(ex, dishes, rng)
        dish = bench.dishes_in(ex.messages[-2]["content"])[0]
        assert dish in new.messages[-2]["content"] and new.messages[-2]["content"] != ex.messages[-2]["content"]
        assert new.messages[-1] == ex.messages[-1] and new.messages[0] == ex.messages[0]
