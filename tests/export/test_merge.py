"""merge: the merged model's logits equal base + adapter (tiny model; the SmolLM2 run is in tests/integration)."""

from __future__ import annotations

import torch
from peft import PeftModel

from artifacts import Manifest
from lm.loading import load_model, load_tokenizer


def test_merged_logits_equal_base_plus_adapter(exported):
    run, merged_dir = exported["run"], exported["model"]
    m = Manifest.read(merged_dir)
    m.verify_files(merged_dir)
    assert m.method == "merged" and m.extra["max_abs_logit_diff"] <= 1e-4
    base_path = Manifest.read(run).base_model["path"]
    tok = load_tokenizer(str(merged_dir))
    merged = load_model(str(merged_dir)).eval()
    ref = PeftModel.from_pretrained(load_model(base_path), str(run / "adapter")).eval()
    ids = tok("The chef said the stew", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
        moved = (load_model(base_path)(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4 and moved > 1e-2  # equal to base+adapter, and the adapter really changes the base
    assert {p.suffix for p in merged_dir.iterdir() if p.name.startswith("model")} == {".safetensors"}
