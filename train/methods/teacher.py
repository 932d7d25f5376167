"""The distillation teacher: a model folder or a finished run, loaded only while it is needed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts import Manifest, RunDir, tree_sha256
from lm.errors import ConfigError
from lm.loading import device, load_model, load_run_weights, load_tokenizer


@dataclass
class Teacher:
    source: str  # what the config said
    model_path: str  # the folder holding the weights (a run: its model/ or its base)
    run: RunDir | None = None  # a finished run whose adapter is merged on load

    @classmethod
    def resolve(cls, ref: str, resolve_model) -> "Teacher":
        """A finished run (manifest.json), else whatever model.name_or_path accepts (resolve_model)."""
        p = Path(ref).expanduser()
        if (p / "manifest.json").is_file():
            rd = RunDir(p)
            if rd.model.is_dir():
                return cls(ref, str(rd.model))
            if not rd.adapter.is_dir():
                raise ConfigError(f"method.teacher: {p} is a run with neither model/ nor adapter/")
            return cls(ref, Manifest.read(p).base_model["path"], rd)
        if p.is_dir() and (p / "adapter").is_dir():
            raise ConfigError(f"method.teacher: {p} is an unfinished run (no manifest.json)")
        try:
            return cls(ref, resolve_model(ref).path)
        except ConfigError as e:
            raise ConfigError(str(e).replace("model.name_or_path", "method.teacher")) from None

    def tokenizer(self):
        return load_tokenizer(self.model_path)

    def fingerprint(self) -> str:
        """Identifies the teacher's weights for the offline cache key."""
        if self.run is not None:
            files = Manifest.read(self.run.root).files
            return "run:" + json.dumps({k: v for k, v in sorted(files.items()) if k.startswith("adapter/")})
        p = Path(self.model_path)
        return tree_sha256(p) if p.is_dir() else self.model_path

    def load(self, dtype: torch.dtype = torch.float32):
        """The teacher in eval mode with frozen weights; a LoRA run's adapter merged in."""
        if self.run is not None:
            model = load_run_weights(self.run, self.model_path, dtype).merge_and_unload()
        else:
            model = load_model(self.model_path, dtype)
        model.to(device()).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def check_same_tokenizer(student_tok, teacher_tok, teacher: str) -> None:
    """Distillation compares distributions token by token: both must use one vocabulary."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        differ = sum(1 for k, v in sv.items() if tv.get(k) != v) + len(set(tv) - set(sv))
        raise ConfigError(f"method.teacher: {teacher}: its tokenizer differs from the student's "
                          f"(vocab {len(tv)} vs {len(sv)}, {differ} entries differ); teacher and student must share one")
