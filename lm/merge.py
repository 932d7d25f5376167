"""Merge a LoRA/IA3 adapter into its base, verified: merged logits must equal base+adapter logits."""

from __future__ import annotations

from pathlib import Path

import torch

from artifacts import Manifest, RunDir, atomic_dir
from artifacts.checksums import file_checksums
from lm.errors import UserError

SAMPLE_PROMPTS = ["The chef said", "What is the main ingredient of the house stew?", "1 2 3 4",
                  "<|im_start|>user\nHow spicy is Korvalo Stew?<|im_end|>\n<|im_start|>assistant\n"]
TOLERANCE = 1e-4  # fp32: merging reorders float sums, nothing more


class MergeError(UserError):
    """The merged weights do not reproduce base+adapter; nothing was written."""


@torch.no_grad()
def max_logit_diff(a, b, tokenizer, prompts: list[str] = SAMPLE_PROMPTS) -> float:
    worst = 0.0
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        worst = max(worst, (a(input_ids=ids).logits.double() - b(input_ids=ids).logits.double()).abs().max().item())
    return worst


def merge_run_adapter(run: Path | str, base_path: str, out: Path | str, *, replace: bool = False) -> dict:
    """Write base+adapter merged into `out` (fp32 safetensors + tokenizer); refuses to write on mismatch.

    The merge is computed in float64 and rounded once to fp32. The reference it is checked against is
    base+adapter evaluated in float64 (up to 1B parameters; fp32 beyond): on SmolLM2 the fp32
    evaluation of base+adapter is itself ~7e-5 away from the exact logits, too close to the 1e-4
    tolerance to serve as the yardstick.
    """
    from peft import PeftModel

    from lm.loading import load_model, load_tokenizer

    rd = RunDir(Path(run))
    tok = load_tokenizer(base_path)
    peft_model = PeftModel.from_pretrained(load_model(base_path, torch.float32), str(rd.adapter)).eval()
    small = sum(p.numel() for p in peft_model.parameters()) <= 1_000_000_000
    ref_dtype = torch.float64 if small else torch.float32
    reference = PeftModel.from_pretrained(load_model(base_path, torch.float32), str(rd.adapter)).to(ref_dtype).eval()
    merged = peft_model.to(torch.float64).merge_and_unload().to(torch.float32).eval()
    diff = max_logit_diff(merged, reference, tok)
    del reference
    if diff > TOLERANCE:
        raise MergeError(f"merged logits differ from base+adapter by {diff:.2e} > {TOLERANCE:.0e}; nothing written")
    with atomic_dir(Path(out), replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        m = Manifest(kind="model", name=Path(out).name, method="merged",
                     extra={"merged_from": str(rd.root), "max_abs_logit_diff": diff,
                            "reference_dtype": str(ref_dtype).replace("torch.", "")})
        if rd.is_finished():
            rm = Manifest.read(rd.root)
            m.base_model, m.peft_config, m.metrics = rm.base_model, rm.peft_config, rm.metrics  # the gate reads metrics
        m.files = file_checksums(tmp)
        m.write(tmp)
    return {"max_abs_logit_diff": diff, "path": str(out)}
