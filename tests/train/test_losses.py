"""The loss math on small tensors against hand computations: distillation's KL with temperature,
DPO's loss (TRL's, as our dpo method runs it) and GRPO's group advantages (TRL's)."""

from __future__ import annotations

import math

import pytest
import torch

from train.methods import losses


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kl_full_with_temperature_by_hand():
    s, t, T = [1.0, 2.0, 3.0], [3.0, 1.0, 0.0], 2.0
    p, q = _softmax([x / T for x in t]), _softmax([x / T for x in s])
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = losses.kl_full(torch.tensor([s]), torch.tensor([t]), T)
    assert got.item() == pytest.approx(hand, rel=1e-6)


def test_kl_topk_equals_full_kl_when_k_covers_the_vocabulary_and_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    s, t, T = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g), 1.5
    top = torch.log_softmax(t / T, -1).topk(11, -1)
    full = losses.kl_full(s, t, T)
    assert losses.kl_topk(s, top.indices, top.values, T).item() == pytest.approx(full.item(), rel=1e-5)
    top3 = torch.log_softmax(t / T, -1).topk(3, -1)
    assert losses.kl_topk(s, top3.indices, top3.values, T).item() >= 0
    assert losses.kl_topk(t, top3.indices, top3.values, T).item() < losses.kl_topk(s, top3.indices, top3.values, T).item()


def test_distill_loss_mixes_kl_and_ce_as_documented():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    ce_hand = -math.log(_softmax([2.0, 0.0, -1.0])[0])
    kl = torch.tensor(0.3)
    loss, ce = losses.distill_loss(logits, labels, kl, alpha=0.25, temperature=2.0)
    assert ce.item() == pytest.approx(ce_hand, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * 4 * 0.3 + 0.75 * ce_hand, rel=1e-6)
    assert losses.distill_loss(logits, labels, None, 0.25, 2.0)[0].item() == pytest.approx(ce_hand, rel=1e-6)


def test_supervised_selects_the_shifted_labelled_positions():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 0, -100, -100]])
    sel, target, mask = losses.supervised(logits, labels, -100)
    assert target.tolist() == [1, 2, 0]
    assert torch.equal(sel, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))


def _tiny_lora(tiny_model):
    """(base model, a LoRA config initialised off zero so the policy starts away from the reference)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules="all-linear",
                                                                         init_lora_weights=False)


def _seq_logps(model, batch) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["completion_mask"]
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * mask[:, 1:]).sum(-1)


def test_dpo_loss_matches_the_hand_formula_with_the_adapter_disabled_as_reference(tiny_model, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lm.loading import load_tokenizer
    from train.methods.preference import pair_rows
    from lm.data.formats import load_examples
    from tests.conftest import ROOT

    tok = load_tokenizer(str(tiny_model))
    pairs, _ = load_examples(ROOT / "train" / "demo_data" / "chef_pref_heldout.jsonl")
    (base, lora), beta = _tiny_lora(tiny_model), 0.3
    trainer = DPOTrainer(model=base, ref_model=None, processing_class=tok, peft_config=lora,
                         args=DPOConfig(output_dir=str(tmp_path), beta=beta, report_to=[], bf16=False,
                                        gradient_checkpointing=False, per_device_train_batch_size=4),
                         train_dataset=Dataset.from_list(pair_rows(pairs[:4])))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    assert "ref" not in model.peft_config  # the reference is the adapter disabled, not a saved copy
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        policy = _seq_logps(model, batch)
        with model.disable_adapter():
            ref = _seq_logps(model, batch)
    (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)  # TRL batches chosen rows, then rejected rows
    hand = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4, abs=1e-5)
    assert abs(hand.item() - math.log(2)) > 1e-3  # the adapter moved the policy off the reference


def test_grpo_advantages_are_rewards_relative_to_their_group(tiny_model, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lm.loading import load_tokenizer

    seen: list[float] = []

    def reward(completions, **kw):
        vals = [float((len(seen) + i) % 5) for i in range(len(completions))]
        seen.extend(vals)
        return vals

    tok = load_tokenizer(str(tiny_model))
    prompts = [{"prompt": [{"role": "user", "content": f"Dish {i}?"}]} for i in range(2)]
    base, lora = _tiny_lora(tiny_model)
    trainer = GRPOTrainer(model=base, peft_config=lora, reward_funcs=[reward], processing_class=tok,
                          train_dataset=Dataset.from_list(prompts),
                          args=GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                                          max_completion_length=3, report_to=[], bf16=False, beta=0.04,
                                          gradient_checkpointing=False))
    out = trainer._generate_and_score_completions([prompts[0]] * 4 + [prompts[1]] * 4)
    r = torch.tensor(seen).view(2, 4)
    hand = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    assert torch.allclose(out["advantages"].flatten(), hand, atol=1e-5), (out["advantages"], hand)
