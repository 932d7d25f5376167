"""Distillation on the real SmolLM2-135M: a half-depth student of the demo run (the session's demo_run
fixture, made in the background), sized for CI (`pytest --full`: the config's full size).

Figures at full size are in docs/train.md; the thresholds here are well below what CI size measures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FULL, ROOT
from tests.integration.runs import train

pytestmark = pytest.mark.slow
DISTILL_STEPS = 40  # CI size (the config's full size with --full)


def heldout_answer_logprob(run: Path) -> float:
    """Mean summed log-probability of the reference answers to the 80 held-out questions (unseen phrasings)."""
    from lm.data.formats import load_examples
    from lm.evaluation import answer_logprobs
    from lm.loading import load_model, load_tokenizer

    examples, _ = load_examples(ROOT / "train" / "demo_data" / "chef_heldout.jsonl")
    model, tok = load_model(str(run / "model")), load_tokenizer(str(run / "model"))
    lps = answer_logprobs(model, tok, [ex.messages for ex in examples])
    return sum(lps) / len(lps)


@pytest.fixture(scope="module")
def students(demo_run, tmp_path_factory) -> dict[str, dict]:
    """The half-depth student distilled from the demo teacher, and the same student on plain CE."""
    work = tmp_path_factory.mktemp("distill")
    # CI size: the validation loss carries the comparison, so the generated answers are scored on 16 rows only
    ci = (f"training.max_steps={DISTILL_STEPS}", "eval.compare_base=false", "eval.max_new_tokens=8",
          "eval.max_examples=16")
    teacher = f"method.teacher={demo_run['run']}"
    out = {"kd": train("smollm2_distill_chef.yaml", work / "kd", teacher, ci=ci),
           "ce": train("smollm2_distill_chef.yaml", work / "ce", teacher, "method.distill_alpha=0", ci=ci)}
    for arm in ("kd", "ce"):
        out[arm]["heldout_answer_logprob"] = heldout_answer_logprob(work / arm) if FULL else float("nan")
    return out


def test_distilled_half_depth_student_beats_plain_cross_entropy(students):
    kd, ce = students["kd"]["tuned"], students["ce"]["tuned"]
    lp_kd, lp_ce = students["kd"]["heldout_answer_logprob"], students["ce"]["heldout_answer_logprob"]
    print(f"\nhalf-depth student: keyword accuracy CE {100 * ce['keyword_accuracy']:.1f} -> distilled "
          f"{100 * kd['keyword_accuracy']:.1f}; held-out answer log-prob CE {lp_ce:.2f} -> distilled {lp_kd:.2f}; "
          f"val loss CE {ce['val_loss']:.3f}, distilled {kd['val_loss']:.3f}")
    # Full size (216 steps, the teacher before replay): keyword accuracy 33.8 % vs 23.8 %, val loss 0.117 vs 0.187.
    # CI size (40 steps) keyword accuracy is a few rows either way (10.0 % vs 6.2 % measured), and so is the
    # held-out answers' likelihood: -17.98 vs -18.65 with the teacher before replay, -19.00 vs -18.65 with the
    # demo teacher trained with replay (its soft labels keep general-chat mass). The validation loss carries
    # the comparison at CI size: 2.19 vs 2.36 before, 1.90 vs 2.36 with the 3-epoch demo teacher, 1.82 vs 2.36
    # with the 2-epoch CI-size one. 20 steps are too few: 3.83 vs 3.75, the half-depth student still recovering.
    if FULL:
        assert kd["keyword_accuracy"] >= ce["keyword_accuracy"] + 0.05, (kd, ce)
    assert kd["val_loss"] < 0.97 * ce["val_loss"], (kd, ce)



