"""Distillation (`method.name: distill`): a teacher's soft labels train a smaller or equal student.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE
  offline  the teacher's top-k log-probs are cached once (teacher_cache.py); the teacher is freed
           before the student trains
  online   the teacher runs beside the student on every batch (full-vocabulary KL);
           on_policy > 0 hands the run to TRL's GKD trainer (the student's own samples, scored
           by the teacher)

TRL's trainers distil on-policy only (GKD, DistillationTrainer); the offline top-k cache and the
alpha/T^2 loss mix on the data's own tokens are written here, on the Trainer's loop.
"""

from __future__ import annotations

import gc
from functools import cached_property
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from lm.chat import IGNORE
from lm.errors import ConfigError
from lm.loading import device
from train.methods import losses, teacher_cache
from train.methods.base import ListDataset, Method, TrainerParts
from train.methods.full import FullFineTuning
from train.methods.peft_methods import LoRA
from train.methods.teacher import Teacher, check_same_tokenizer


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'every_other' -> 0,2,4...; '0,2,5' -> those; '' -> all."""
    if not spec:
        return list(range(n_layers))
    if spec == "every_other":
        return list(range(0, n_layers, 2))
    try:
        keep = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"config: method.student_layers: {spec!r}: 'every_other' or layer indices like '0,2,4'") from None
    if not keep or keep[0] < 0 or keep[-1] >= n_layers:
        raise ConfigError(f"config: method.student_layers: {spec!r}: indices must lie in 0..{n_layers - 1}")
    return keep


def keep_layers(model, keep: list[int]):
    """The model with only the kept decoder layers (same embeddings, head and tokenizer)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"config: method.student_layers: {type(model).__name__} has no model.layers to subset")
    inner.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(inner.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new  # the KV cache indexes layers by position
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return model


class KDCollator:
    """The base collator plus the cached teacher vectors of the batch's rows (offline mode)."""

    def __init__(self, base, top: teacher_cache.TopK):
        self.base, self.top = base, top

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(rows)
        if all("kd_row" in r for r in rows):
            batch["kd_idx"], batch["kd_logp"] = self.top.rows([r["kd_row"] for r in rows])
        return batch


class DistillTrainer(Trainer):
    def __init__(self, *a, alpha: float, temperature: float, teacher=None, **kw):
        super().__init__(*a, **kw)
        self.alpha, self.temperature, self.teacher = alpha, temperature, teacher
        self._parts: dict[str, list[float]] = {"distill_kl": [], "distill_ce": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        kd_idx, kd_logp = inputs.pop("kd_idx", None), inputs.pop("kd_logp", None)
        out = model(**inputs)
        student, target, mask = losses.supervised(out.logits, labels, IGNORE)
        kl = None
        if kd_idx is not None:
            kl = losses.kl_topk(student, kd_idx, kd_logp, self.temperature)
        elif self.teacher is not None and self.alpha > 0:
            with torch.no_grad():
                teacher = self.teacher(**inputs).logits[:, :-1][mask]
            kl = losses.kl_full(student, teacher, self.temperature)
        loss, ce = losses.distill_loss(student, target, kl, self.alpha, self.temperature)
        if model.training:
            self._parts["distill_ce"].append(ce.item())
            if kl is not None:
                self._parts["distill_kl"].append(kl.item())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs: the loss's two parts, averaged since the last log
            for name, vals in self._parts.items():
                if vals:
                    logs[name] = sum(vals) / len(vals)
                vals.clear()
        super().log(logs, *args, **kwargs)


class Distill(Method):
    name = "distill"

    @property
    def saves_adapter(self) -> bool:
        return self.cfg.student == "lora"

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.method
        if m.student not in ("lora", "full"):
            raise ConfigError(f"config: method.student: {m.student!r}; choose lora or full")
        if m.student_layers and m.student != "full":
            raise ConfigError("config: method.student_layers: a student with dropped layers is a new model; "
                              "set method.student=full")
        if m.distill_mode not in ("offline", "online"):
            raise ConfigError(f"config: method.distill_mode: {m.distill_mode!r}; choose offline or online")
        if not 0.0 <= m.distill_alpha <= 1.0 or m.temperature <= 0 or m.top_k < 1:
            raise ConfigError("config: method.distill_alpha in [0, 1], method.temperature > 0 and method.top_k >= 1")
        if m.distill_alpha > 0 and not m.teacher:
            raise ConfigError("config: method.teacher: distill needs a teacher (a model folder or a finished run)")
        if not 0.0 <= m.on_policy <= 1.0 or (m.on_policy > 0 and m.distill_mode != "online"):
            raise ConfigError("config: method.on_policy: a fraction in [0, 1], and only with distill_mode=online")

    @cached_property
    def _teacher(self) -> Teacher | None:
        if not self.cfg.teacher or self.cfg.distill_alpha == 0:
            return None
        from train.base_model import resolve

        return Teacher.resolve(self.cfg.teacher, resolve)

    def check_setup(self, cfg, model_path, tok, splits) -> None:
        if cfg.method.student_layers:
            from transformers import AutoConfig

            parse_layers(cfg.method.student_layers, AutoConfig.from_pretrained(model_path).num_hidden_layers)
        teacher = self._teacher
        if teacher is not None:
            check_same_tokenizer(tok, teacher.tokenizer(), cfg.method.teacher)

    def load(self, path, dtype, cfg):
        model = super().load(path, dtype, cfg)
        if not cfg.method.student_layers:
            return model
        return keep_layers(model, parse_layers(cfg.method.student_layers, model.config.num_hidden_layers))

    def prepare(self, model, cfg):
        return (LoRA() if cfg.student == "lora" else FullFineTuning()).prepare(model, cfg)

    def peft_config(self, model):
        return LoRA().peft_config(model) if self.cfg.student == "lora" else None

    def build_trainer(self, parts: TrainerParts) -> Trainer:
        m, teacher = self.cfg, self._teacher
        if m.on_policy > 0:
            from train.methods.gkd import build_gkd_trainer

            return build_gkd_trainer(parts, teacher.load())
        kw = dict(alpha=m.distill_alpha, temperature=m.temperature)
        train_rows, collate = parts.train_feats, parts.collator()
        if teacher is not None and m.distill_mode == "offline":
            top = self._offline_topk(parts, teacher)
            train_rows, collate = [{**f, "kd_row": i} for i, f in enumerate(train_rows)], KDCollator(collate, top)
        elif teacher is not None:
            kw["teacher"] = teacher.load()
        return DistillTrainer(model=parts.model, args=parts.make_args(TrainingArguments),
                              train_dataset=ListDataset(train_rows),
                              eval_dataset=ListDataset(parts.val_feats) if parts.val_feats else None,
                              data_collator=collate, callbacks=parts.callbacks, **kw)

    def _offline_topk(self, parts: TrainerParts, teacher: Teacher) -> teacher_cache.TopK:
        m = self.cfg
        key = teacher_cache.cache_key(teacher.fingerprint(), parts.train_feats, m.temperature, m.top_k)
        root = parts.run_dir.root / "teacher_cache" if not m.teacher_cache else Path(m.teacher_cache)
        folder = root / key[:16]
        top = teacher_cache.load(folder)
        if top is not None:
            print(f"distill: reusing the teacher's top-{m.top_k} from {folder}", flush=True)
            return top
        print(f"distill: caching the teacher's top-{m.top_k} log-probs on {len(parts.train_feats)} rows", flush=True)
        model = teacher.load()
        top = teacher_cache.compute(model, parts.train_feats, parts.tok.pad_token_id, m.temperature, m.top_k)
        del model
        gc.collect()
        if device().type == "cuda":
            torch.cuda.empty_cache()
        teacher_cache.save(folder, top, {"teacher": m.teacher, "temperature": m.temperature, "top_k": m.top_k,
                                         "rows": len(parts.train_feats), "tokens": int(top.offsets[-1]), "key": key})
        return top
