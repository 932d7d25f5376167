"""Merge a LoRA/IA3 adapter into its base, verified: merged logits must equal base+adapter logits."""

from __future__ import annotations

from pathlib import Path

import torch

from artifacts import Manifest, RunDir, atomic_dir
from artifacts.checksums import file_checksums

SAMPLE_PROMPTS = ["The chef said", "What is the main ingredient of the house stew?", "1 2 3 4"]
TOLERANCE = 1e-4  # fp32: merging reorders float sums, nothing more


class MergeError(ValueError):
    pass


@torch.no_grad()
def max_logit_diff(a, b, tokenizer, prompts: list[str] = SAMPLE_PROMPTS) -> float:
    worst = 0.0
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        worst = max(worst, (a(input_ids=ids).logits.float() - b(input_ids=ids).logits.float()).abs().max().item())
    return worst


def merge_run_adapter(run: Path | str, base_path: str, out: Path | str, *, replace: bool = False) -> dict:
    """Write base+adapter merged into `out` (fp32 safetensors + tokenizer); refuses to write on mismatch."""
    from peft import PeftModel

    from train.modeling import load_model, load_tokenizer

    rd = RunDir(Path(run))
    tok = load_tokenizer(base_path)
    peft_model = PeftModel.from_pretrained(load_model(base_path, torch.float32), str(rd.adapter)).eval()
    reference = PeftModel.from_pretrained(load_model(base_path, torch.float32), str(rd.adapter)).eval()
    merged = peft_model.merge_and_unload().eval()
    diff = max_logit_diff(merged, reference, tok)
    if diff > TOLERANCE:
        raise MergeError(f"merged logits differ from base+adapter by {diff:.2e} > {TOLERANCE:.0e}; nothing written")
    with atomic_dir(Path(out), replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        m = Manifest(kind="model", name=Path(out).name, method="merged",
                     extra={"merged_from": str(rd.root), "max_abs_logit_diff": diff})
        if rd.is_finished():
            rm = Manifest.read(rd.root)
            m.base_model, m.peft_config = rm.base_model, rm.peft_config
        m.files = file_checksums(tmp)
        m.write(tmp)
    return {"max_abs_logit_diff": diff, "path": str(out)}
