"""The fine-tuning recipe: setup -> train -> save -> evaluate -> record (-> publish).

Nothing is written before the data and config are fully validated. Weights appear in the run
directory by atomic rename, and manifest.json is written last: a run without one is unfinished
and can be neither published nor served.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from artifacts import Manifest, Registry, RunDir, atomic_dir, atomic_write_text
from artifacts.checksums import file_checksums
from artifacts.servability import servability
from train import evaluate, reporting
from train.base_model import resolve
from train.config import Config
from train.data.prepare import prepare
from train.data.tokenize import Collator, pack, tokenize
from train.errors import ConfigError
from train.methods import get_method
from train.modeling import DTYPES, device, load_model, load_run_weights, load_tokenizer, mixed_precision


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_output(rd: RunDir, overwrite: bool, resume: bool) -> None:
    if resume:
        if rd.is_finished():
            raise ConfigError(f"{rd.root}: run already finished; nothing to resume")
        if rd.last_checkpoint() is None:
            raise ConfigError(f"{rd.root}: no checkpoint to resume from")
        return
    if rd.root.exists() and any(rd.root.iterdir()):
        if not overwrite:
            raise ConfigError(f"{rd.root}: output.dir exists; use --resume to continue it or output.overwrite=true")


def _training_args(cfg: Config, rd: RunDir, has_val: bool) -> TrainingArguments:
    args = _build_training_args(cfg, rd, has_val)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.n_gpu > 1:
        # One process and several visible GPUs: the Trainer would fall back to nn.DataParallel, which is
        # slow and silently multiplies the batch. Use one GPU; torchrun is the way to use them all.
        print(f"note: {args.n_gpu} GPUs visible but one process: training on one GPU. For all of them: "
              f"torchrun --nproc_per_node {args.n_gpu} -m train ...", flush=True)
        args._n_gpu = 1
    return args


def _build_training_args(cfg: Config, rd: RunDir, has_val: bool) -> TrainingArguments:
    t = cfg.training
    precision = mixed_precision(cfg.model.dtype)
    early = t.early_stopping_patience > 0 and has_val
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(rd.tensorboard)
    return TrainingArguments(
        output_dir=str(rd.checkpoints),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=precision == "bf16", fp16=precision == "fp16",
        seed=t.seed, data_seed=t.seed,
        eval_strategy="steps" if has_val else "no", eval_steps=t.eval_steps,
        save_strategy="steps", save_steps=t.eval_steps if early else t.save_steps,
        save_total_limit=t.save_total_limit, save_only_model=False,
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None, greater_is_better=False,
        logging_steps=t.logging_steps, logging_first_step=True, report_to=["tensorboard"],
        remove_unused_columns=False, dataloader_num_workers=0,
        fsdp=t.fsdp or "", ddp_find_unused_parameters=False if cfg.method.name != "prompt_tuning" else None,
        disable_tqdm=False,
    )


def _save_weights(trainer: Trainer, method, tokenizer, rd: RunDir) -> Path:
    """All ranks call save_model (FSDP gathers shards); rank 0 renames the staging folder into place."""
    final = rd.adapter if method.saves_adapter else rd.model
    staging = rd.root / f".staging-{final.name}"
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config is in config.yaml
        if not method.saves_adapter:
            tokenizer.save_pretrained(staging)
        with atomic_dir(final, replace=True) as tmp:
            for p in staging.iterdir():
                shutil.move(str(p), tmp / p.name)
        shutil.rmtree(staging, ignore_errors=True)
    return final


def run(cfg: Config, resume: bool = False) -> RunDir:
    t0 = time.time()
    if cfg.training.num_threads > 0:
        torch.set_num_threads(cfg.training.num_threads)
    set_seed(cfg.training.seed)
    rd = RunDir(Path(cfg.output.dir))
    check_output(rd, cfg.output.overwrite, resume)
    splits = prepare(cfg.data, cfg.training.seed)  # validates every row: DataError before any write
    ref = resolve(cfg.model.name_or_path)
    tok = load_tokenizer(ref.path, cfg.model.trust_remote_code)
    train_feats, train_tok = tokenize(tok, splits.train, cfg.data.max_length)
    val_feats, val_tok = tokenize(tok, splits.validation, cfg.data.max_length)
    if cfg.data.packing:
        train_feats = pack(train_feats, cfg.data.max_length)
    method = get_method(cfg.method.name)
    # PEFT keeps the frozen base in the training precision; full fine-tuning keeps fp32 master weights.
    weight_dtype = torch.bfloat16 if mixed_precision(cfg.model.dtype) == "bf16" and method.saves_adapter else torch.float32
    model = load_model(ref.path, weight_dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    vocab_before = model.get_input_embeddings().weight.shape[0]
    # No KV cache in training; it also lets transformers derive block-diagonal masks for packed rows.
    model.config.use_cache = False
    model = method.prepare(model, cfg.method)  # ConfigError (e.g. unknown target module) before any write
    base_sha = ref.sha256()

    data_report: dict[str, Any] = {**splits.report, "tokens": {"train": train_tok.__dict__, "validation": val_tok.__dict__},
                                   "packed_rows": len(train_feats) if cfg.data.packing else None}
    if _rank() == 0:
        if cfg.output.overwrite and rd.root.exists() and not resume:
            shutil.rmtree(rd.root)
        rd.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.config, cfg.to_yaml())
        atomic_write_text(rd.data_report, json.dumps(data_report, indent=2) + "\n")
        trunc = train_tok.truncated_rows + val_tok.truncated_rows
        print(f"data: {splits.format}, train {len(splits.train)} rows / {train_tok.tokens} tokens, "
              f"validation {len(splits.validation)}, eval {len(splits.eval)}; "
              f"{splits.report['train']['duplicates_dropped']} duplicates and "
              f"{splits.report['train']['empty_rows_dropped']} empty rows dropped; "
              f"{trunc} rows truncated ({train_tok.truncated_tokens + val_tok.truncated_tokens} tokens)", flush=True)

    callbacks = [reporting.JsonlMetrics(rd.metrics_log)]
    if cfg.training.early_stopping_patience > 0 and val_feats:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    trainer = method.trainer_cls()(
        model=model, args=_training_args(cfg, rd, bool(val_feats)),
        train_dataset=ListDataset(train_feats), eval_dataset=ListDataset(val_feats) if val_feats else None,
        data_collator=Collator(tok.pad_token_id, cfg.data.pad_to_multiple_of), callbacks=callbacks)
    ckpt = rd.last_checkpoint() if resume else None
    train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    _save_weights(trainer, method, tok, rd)
    train_seconds = time.time() - t0
    if not trainer.is_world_process_zero():
        return rd
    peft_cfg = method.peft_config(trainer.model)
    del trainer, model

    evaluation: dict[str, Any] = {"eval_set": splits.report.get("eval"), "train_seconds": round(train_seconds, 1),
                                  "train_steps": train_out.global_step, "train_loss": train_out.training_loss}
    preds_base: list[str] = []
    eval_dtype = DTYPES["bfloat16"] if mixed_precision(cfg.model.dtype) == "bf16" else torch.float32
    if cfg.eval.enabled:
        examples = splits.eval[: cfg.eval.max_examples or None]
        tuned = load_run_weights(rd, ref.path, eval_dtype)  # as saved on disk: also proves it loads
        evaluation["tuned"], preds = evaluate.score(tuned, tok, val_feats, examples, splits.labels,
                                                    cfg.eval.max_new_tokens, cfg.eval.batch_size)
        del tuned
        if cfg.eval.compare_base:
            base = load_model(ref.path, eval_dtype, cfg.model.trust_remote_code).to(device())
            evaluation["base"], preds_base = evaluate.score(base, tok, val_feats, examples, splits.labels,
                                                            cfg.eval.max_new_tokens, cfg.eval.batch_size)
            del base
            head = evaluate.headline_metric(evaluation["tuned"])
            evaluation["headline"] = {"metric": head, "base": evaluation["base"][head],
                                      "tuned": evaluation["tuned"][head],
                                      "gain_points": 100 * (evaluation["tuned"][head] - evaluation["base"][head]),
                                      "eval_rows": len(examples)}
        atomic_write_text(rd.predictions, "".join(
            json.dumps({"where": ex.where, "messages": ex.messages[:-1], "reference": ex.messages[-1]["content"],
                        "tuned": preds[i], "base": preds_base[i] if preds_base else None}) + "\n"
            for i, ex in enumerate(examples)))
    atomic_write_text(rd.eval, json.dumps(evaluation, indent=2) + "\n")

    if cfg.output.merge and method.saves_adapter:
        from export.merge import merge_run_adapter

        merge_run_adapter(rd, ref.path, rd.model)
    reporting.plot_losses(rd.metrics_log, rd.plot)
    serv = servability(peft_cfg, vocab_changed=False) if method.saves_adapter else {
        "vllm": {"ok": True, "reasons": [], "as": "base model (full weights in model/)"}, "peft": {"ok": False}}
    atomic_write_text(rd.model_card, reporting.model_card(rd, cfg.to_dict(), evaluation, data_report, serv))

    manifest = Manifest(
        kind="run", name=rd.root.name, method=cfg.method.name,
        base_model={"name": ref.name, "source": ref.source, "path": ref.path, "sha256": base_sha,
                    "architecture": _arch(ref.path), "vocab_size": vocab_before},
        peft_config=peft_cfg, dataset=splits.report, servability=serv,
        metrics={"headline": evaluation.get("headline"), "tuned": evaluation.get("tuned"),
                 "base": evaluation.get("base")})
    for folder in (rd.adapter, rd.model):
        if folder.is_dir():
            manifest.files.update({f"{folder.name}/{k}": v for k, v in file_checksums(folder).items()})
    manifest.record_files(rd.root, ["config.yaml", "eval.json", "data_report.json"])
    manifest.write(rd.root)  # last: its presence marks the run finished

    if cfg.output.registry:
        name = cfg.output.adapter_name or rd.root.name
        path = Registry(cfg.output.registry).publish_run(rd.root, name, replace=True)
        print(f"published adapter {name!r} to {path}", flush=True)
    return rd


def _arch(path: str) -> str | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        return (json.loads(cfg.read_text()).get("architectures") or [None])[0]
    return None
