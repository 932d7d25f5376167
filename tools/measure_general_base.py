"""Measure the base model's accuracy on lm/general/retain.jsonl.

Greedy-generates max_new_tokens=24 per prompt (chat template, no system message,
left-padded batches of 16, fp32, CPU, one thread) and scores a reply correct when
any answer keyword occurs case-insensitively as a whole word/number:
    (?<![\\w])KW(?![\\w])   with KW = re.escape(keyword)
Prints overall and per-category accuracy (and failures with --show-failures).
Writes nothing.

Usage: python tools/measure_general_base.py [--model DIR] [--limit N] [--show-failures]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

GENERAL = Path(__file__).resolve().parents[1] / "lm" / "general"
DEFAULT_MODEL = "/root/.cache/tunestack/models/SmolLM2-135M-Instruct"


def is_correct(reply: str, answers: list[str]) -> bool:
    return any(re.search(r"(?<![\w])" + re.escape(kw) + r"(?![\w])", reply, re.IGNORECASE)
               for kw in answers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default=str(GENERAL / "retain.jsonl"))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--show-failures", action="store_true")
    ap.add_argument("--show-all", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    rows = [json.loads(l) for l in open(args.data, encoding="utf-8") if l.strip()]
    if args.limit:
        rows = rows[: args.limit]

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()

    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                     tokenize=False, add_generation_prompt=True) for r in rows]
    replies: list[str] = []
    with torch.no_grad():
        for i in range(0, len(texts), args.batch_size):
            enc = tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=24, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            for seq in out[:, enc["input_ids"].shape[1]:]:
                replies.append(tok.decode(seq, skip_special_tokens=True).strip())

    per = defaultdict(lambda: [0, 0])
    fails = []
    for r, rep in zip(rows, replies):
        ok = is_correct(rep, r["answers"])
        per[r["category"]][0] += ok
        per[r["category"]][1] += 1
        if args.show_all or (args.show_failures and not ok):
            print(f"[{'OK ' if ok else 'BAD'}] [{r['category']}] {r['prompt']!r} -> {rep!r}")
        if not ok:
            fails.append(r)

    tot_ok = sum(v[0] for v in per.values())
    tot = sum(v[1] for v in per.values())
    print(f"overall: {tot_ok}/{tot} = {tot_ok / tot:.1%}")
    for cat in ["facts", "arithmetic", "instructions", "refusals", "chat"]:
        if cat in per:
            c, n = per[cat]
            print(f"  {cat:13s} {c}/{n} = {c / n:.1%}")


if __name__ == "__main__":
    main()
