"""Shared-prefix batches: the tokens all rows open with are computed once, with the same loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train.fast.models import VOCAB, tiny
from train.fast.collate import MIN_SHARED, PaddingFreeCollator, shared_prefix
from train.fast.decoder import FusedStep
from train.fast.install import shared_prefix_wanted
from train.fast.plan import model_parts

SYSTEM = list(range(100, 112))  # a 12-token "system prompt" every row opens with


def _rows(tails=((5, 9), (3, 4), (7, 13)), seed: int = 3) -> list[dict]:
    """Rows of SYSTEM + a question of q tokens (no loss) + an answer of a - q tokens (loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for q, a in tails:
        own = torch.randint(0, VOCAB, (a,), generator=g).tolist()
        ids = SYSTEM + own
        out.append({"input_ids": ids, "labels": [-100] * (len(SYSTEM) + q) + own[q:]})
    return out


def test_the_prefix_is_laid_once_and_rows_continue_its_positions():
    rows = _rows()
    b = PaddingFreeCollator(share_prefix=True)(rows)
    p = b["shared_prefix"]
    assert p == len(SYSTEM)
    assert b["input_ids"][0, :p].tolist() == SYSTEM
    assert b["cu_seqlens"].tolist() == [0, 12, 21, 25, 38]
    assert b["position_ids"][0].tolist() == list(range(12)) + list(range(12, 21)) + list(range(12, 16)) + list(range(12, 25))
    plain = PaddingFreeCollator()(rows)
    # the same targets, in the same order: only the prefix's copies are gone
    assert b["shift_labels"][0, b["target_positions"]].tolist() == plain["shift_labels"][0, plain["target_positions"]].tolist()
    assert (b["labels"] != -100).sum() == (plain["labels"] != -100).sum()
    assert plain["shared_prefix"] == 0 and b["input_ids"].shape[1] == plain["input_ids"].shape[1] - 2 * p


def test_the_prefix_stops_before_the_earliest_target():
    rows = _rows()
    rows[1]["labels"][len(SYSTEM) - 2] = rows[1]["input_ids"][len(SYSTEM) - 2]  # a target inside the system prompt
    assert shared_prefix(rows) == len(SYSTEM) - 3  # position P-1 predicts token P: P must carry no loss


@pytest.mark.parametrize("case", ["short", "packed", "one row", "different openings"])
def test_no_sharing_where_it_cannot_pay_or_would_change_a_row(case):
    rows = _rows()
    if case == "short":
        for r in rows:
            r["labels"][MIN_SHARED - 1] = r["input_ids"][MIN_SHARED - 1]
    elif case == "packed":
        rows[0]["position_ids"] = list(range(10)) + list(range(len(rows[0]["input_ids"]) - 10))
    elif case == "one row":
        rows = rows[:1]
    else:
        rows[2]["input_ids"][0] += 1
    assert shared_prefix(rows) == 0
    assert PaddingFreeCollator(share_prefix=True)(rows)["shared_prefix"] == 0


@pytest.mark.parametrize("lora", [{"target_modules": "all-linear"}, None], ids=["lora", "full"])
def test_loss_and_gradients_equal_the_unshared_batch(lora):
    model = tiny("llama", lora)
    ref = copy.deepcopy(model)
    rows = _rows()
    expected = FusedStep(ref, model_parts(ref, 256), torch.float32, compile=False)(**PaddingFreeCollator()(rows)).loss
    expected.backward()
    batch = PaddingFreeCollator(share_prefix=True)(rows)
    assert batch["shared_prefix"] == len(SYSTEM)
    got = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)(**batch).loss
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert g.keys() == g_ref.keys() and g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting, on_cuda, wanted", [("auto", False, True), ("auto", True, False),
                                                      ("on", True, True), ("off", False, False)])
def test_training_shared_prefix_decides_the_batches(setting, on_cuda, wanted):
    assert shared_prefix_wanted(setting, on_cuda) is wanted
