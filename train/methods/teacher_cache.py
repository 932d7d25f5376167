"""Offline distillation: the teacher's top-k log-probabilities on the training tokens, computed once.

Stored as safetensors beside the run (or in method.teacher_cache, shared across runs), keyed by
the teacher's weights, the training tokens, the temperature and k; meta.json holds the checksums,
verified on every reuse. Row r's vectors are rows offsets[r]:offsets[r+1], one per supervised
position in order (the positions losses.supervised selects).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from artifacts import atomic_dir, sha256_file
from lm.chat import IGNORE
from lm.errors import ConfigError
from lm.padding import Collator
from train.methods.losses import supervised

FILE = "topk.safetensors"


@dataclass
class TopK:
    idx: torch.Tensor  # (N, k) int32 token ids
    logp: torch.Tensor  # (N, k) float32 teacher log-probs at the temperature
    offsets: torch.Tensor  # (rows + 1,) int64

    def rows(self, row_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in row_ids]
        return (torch.cat([self.idx[a:b] for a, b in spans]), torch.cat([self.logp[a:b] for a, b in spans]))


def cache_key(fingerprint: str, features: list[dict], temperature: float, k: int) -> str:
    h = hashlib.sha256(json.dumps([fingerprint, temperature, k]).encode())
    for f in features:
        h.update(json.dumps([f["input_ids"], f["labels"], f.get("position_ids")]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute(teacher, features: list[dict], pad_id: int, temperature: float, k: int, batch_size: int = 8) -> TopK:
    collate, dev = Collator(pad_id), next(teacher.parameters()).device
    idx, logp, counts = [], [], []
    for s in range(0, len(features), batch_size):
        batch = {n: v.to(dev) for n, v in collate(features[s:s + batch_size]).items()}
        labels = batch.pop("labels")
        sel, _, mask = supervised(teacher(**batch).logits, labels, IGNORE)
        top = torch.log_softmax(sel.float() / temperature, dim=-1).topk(k, dim=-1)
        idx.append(top.indices.to(torch.int32).cpu())
        logp.append(top.values.cpu())
        counts += mask.sum(1).tolist()
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return TopK(torch.cat(idx), torch.cat(logp), offsets)


def save(folder: Path, top: TopK, meta: dict) -> None:
    with atomic_dir(folder, replace=True) as tmp:
        save_file({"idx": top.idx, "logp": top.logp, "offsets": top.offsets}, str(tmp / FILE))
        meta = {**meta, "files": {FILE: sha256_file(tmp / FILE)}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load(folder: Path) -> TopK | None:
    """The cached top-k, or None when absent; a checksum mismatch is an error, never silently reused."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    for name, digest in meta["files"].items():
        if sha256_file(folder / name) != digest:
            raise ConfigError(f"{folder / name}: teacher cache checksum mismatch; delete {folder} to recompute it")
    t = load_file(str(folder / FILE))
    return TopK(t["idx"], t["logp"], t["offsets"])
