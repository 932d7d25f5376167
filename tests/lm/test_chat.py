"""Chat-template tokenisation: loss on assistant tokens only, truncation, packing."""

from __future__ import annotations

import torch

from lm.data.formats import Example
from lm.chat import IGNORE, encode_chat
from lm.features import pack, tokenize
from lm.padding import Collator
from lm.loading import load_model, load_tokenizer

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Korvalo Stew made with?"},
        {"role": "assistant", "content": "Smoked eel."}, {"role": "user", "content": "Price?"},
        {"role": "assistant", "content": "$18."}]


def test_loss_only_on_assistant_turns(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ids, labels = encode_chat(tok, MSGS)
    learned = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert learned == "Smoked eel.<|im_end|>\n$18.<|im_end|>\n"
    assert "What is" not in learned and "Be brief" not in learned


def test_truncation_is_reported(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    long = Example([{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}], "f:1")
    short = Example(MSGS, "f:2")
    feats, rep = tokenize(tok, [short, long], max_length=64)
    # The long row loses its answer to truncation, so it is dropped and counted, not trained on silently.
    assert rep.truncated_rows == 1 and rep.truncated_tokens > 100
    assert rep.rows_without_answer_after_truncation == 1 and len(feats) == 1


def test_packing_equals_separate_rows(tiny_model):
    """Packed rows must not attend to each other: per-token logits equal the unpacked ones."""
    tok = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model)).eval()
    rows = [Example(MSGS, "a"), Example(MSGS[:3], "b"), Example([MSGS[1], MSGS[2]], "c")]
    feats, _ = tokenize(tok, rows, 512)
    packed = pack(feats, 512)
    assert len(packed) == 1
    batch = Collator(tok.pad_token_id)(packed)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits_packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
        order = sorted(feats, key=lambda f: -len(f["input_ids"]))
        for s, f in zip(starts, order):
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(logits_packed[s:s + len(f["input_ids"])], alone, atol=1e-5, rtol=1e-4)
