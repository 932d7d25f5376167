"""The fine-tuning recipe: setup -> train -> save -> evaluate -> record (-> publish).

    recipe = FineTuneRecipe(cfg)
    recipe.setup()      validate config and data, load tokenizer and model, wrap it for the method
    recipe.train()      write config.yaml + data_report.json, run the method's Trainer
    recipe.save()       adapter/ or model/ by atomic rename (all ranks; rank 0 renames)
    recipe.evaluate()   base vs tuned on the eval set -> eval.json, eval_predictions.jsonl
    recipe.record()     merge (optional), plot, model card, then manifest.json last
    recipe.publish()    into the registry, when output.registry is set

Nothing is written before the data and config are fully validated. Weights appear in the run
directory by atomic rename, and manifest.json is written last: a run without one is unfinished
and can be neither published nor served. A method plugs in through train/methods (its own
`prepare` and Trainer subclass); the steps stay the same.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from artifacts import GateRefused, Manifest, Registry, RegistryError, RunDir, atomic_dir, atomic_write_text
from artifacts.checksums import file_checksums
from lm import evaluation, retention
from lm.adapters import servability
from lm.architectures import architecture_name
from lm.data.prepare import Splits, prepare
from lm.errors import ConfigError, UserError
from lm.features import TokenReport, pack, tokenize
from lm.loading import device, load_model, load_run_weights, load_tokenizer, mixed_precision
from lm.merge import merge_run_adapter
from train import base_scores, checkpoints, replay, reporting, tracking
from train.base_model import ResolvedModel, cache_dir, resolve
from train.config import Config
from train.disk import check_writable, writing
from train.methods import Method, TrainerParts, check_config, get_method


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_output(rd: RunDir, overwrite: bool, resume: bool, registry: str | None = None) -> None:
    """Refuse, before anything is trained, an output.dir (or registry) this run cannot or must not write."""
    check_writable(rd.root, "output.dir")
    if registry:
        check_writable(registry, "output.registry")
    if resume:
        if rd.is_finished():
            raise ConfigError(f"{rd.root}: run already finished; nothing to resume")
        checkpoints.resume_point(rd)  # ConfigError when no checkpoint is complete
        return
    if rd.root.exists() and any(rd.root.iterdir()) and _rank() == 0:  # other torchrun ranks may see rank 0's first writes
        if not overwrite:
            raise ConfigError(f"{rd.root}: output.dir exists; use --resume to continue it or output.overwrite=true")


def _training_args(cfg: Config, rd: RunDir, has_val: bool, cls: type[TrainingArguments] = TrainingArguments,
                   **method_fields: Any) -> TrainingArguments:
    """The run's TrainingArguments, as `cls` (a TRL config for TRL-backed methods) with the method's fields."""
    args = cls(**{**_training_kwargs(cfg, rd, has_val), **method_fields})
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.n_gpu > 1:
        # One process and several visible GPUs: the Trainer would fall back to nn.DataParallel, which is
        # slow and silently multiplies the batch. Use one GPU; torchrun is the way to use them all.
        print(f"note: {args.n_gpu} GPUs visible but one process: training on one GPU. For all of them: "
              f"torchrun --nproc_per_node {args.n_gpu} -m train ...", flush=True)
        args._n_gpu = 1
    return args


def _training_kwargs(cfg: Config, rd: RunDir, has_val: bool) -> dict[str, Any]:
    t = cfg.training
    precision = mixed_precision(cfg.model.dtype)
    early = t.early_stopping_patience > 0 and has_val
    return dict(
        output_dir=str(rd.checkpoints),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=precision == "bf16", fp16=precision == "fp16",
        seed=t.seed, data_seed=t.seed,
        eval_strategy="steps" if has_val else "no", eval_steps=t.eval_steps,
        save_strategy="steps", save_steps=t.eval_steps if early else t.save_steps,
        save_total_limit=t.save_total_limit, save_only_model=False,
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None, greater_is_better=False,
        logging_steps=t.logging_steps, logging_first_step=True, report_to="none",  # TensorBoard: reporting.TensorBoard
        remove_unused_columns=False, dataloader_num_workers=0,
        fsdp=t.fsdp or "", ddp_find_unused_parameters=False if cfg.method.name != "prompt_tuning" else None,
        ddp_bucket_cap_mb=t.ddp_bucket_mb or None, ddp_broadcast_buffers=False,  # buffers (rotary tables) never change
        ddp_static_graph=t.ddp_static_graph and cfg.method.name != "prompt_tuning",
        use_cpu=not torch.cuda.is_available(),  # else accelerate runs each torchrun rank alone on a CPU (no gloo DDP)
        disable_tqdm=False,
    )


@dataclass
class Prepared:
    """What setup() validated and loaded: nothing has been written yet."""

    splits: Splits
    ref: ResolvedModel
    tok: Any
    train_feats: list[dict]
    val_feats: list[dict]
    train_tok: TokenReport
    val_tok: TokenReport
    method: Method
    model: Any
    base_sha: str | None
    vocab_size: int


@dataclass
class Outcome:
    """What train() and evaluate() produced, for record()."""

    train_seconds: float = 0.0
    train_steps: int = 0
    train_loss: float = 0.0
    peft_config: dict | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)


class FineTuneRecipe:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.rd = RunDir(Path(cfg.output.dir))
        self.t0 = time.time()
        self.p: Prepared | None = None
        self.out = Outcome()
        self.is_main = _rank() == 0
        self.trackers = tracking.Trackers()  # started by train(), after the run directory is written

    # -- setup: validate everything, write nothing ----------------------------------------------
    def setup(self) -> Prepared:
        cfg = self.cfg
        check_config(cfg)  # the method's own config checks (train.config imports no method)
        tracking.check(cfg)  # a tracker's missing client or server: exit 2 before any work
        if cfg.training.num_threads > 0:
            torch.set_num_threads(cfg.training.num_threads)
        set_seed(cfg.training.seed)
        check_output(self.rd, cfg.output.overwrite, self.resume, cfg.output.registry)
        splits = prepare(cfg.data, cfg.training.seed)  # validates every row: DataError before any write
        if self.resume:  # before the model loads: a refused resume costs nothing
            checkpoints.check_same_run(self.rd, cfg.to_dict(), splits.report)
        ref = resolve(cfg.model.name_or_path)
        tok = load_tokenizer(ref.path, cfg.model.trust_remote_code)
        base_sha = ref.sha256()
        if cfg.data.replay > 0:
            self._add_replay(splits, ref, tok, base_sha)
        train_feats, train_tok = tokenize(tok, splits.train, cfg.data.max_length)
        val_feats, val_tok = tokenize(tok, splits.validation, cfg.data.max_length)
        if cfg.data.packing:
            train_feats = pack(train_feats, cfg.data.max_length)
        method = get_method(cfg.method.name, cfg.method)
        method.check_setup(cfg, ref.path, tok, splits)  # e.g. a teacher's tokenizer or the data format: before any write
        # PEFT keeps the frozen base in the training precision; full fine-tuning keeps fp32 master weights.
        bf16 = mixed_precision(cfg.model.dtype) == "bf16"
        weight_dtype = torch.bfloat16 if bf16 and method.saves_adapter else torch.float32
        model = method.load(ref.path, weight_dtype, cfg)
        vocab = model.get_input_embeddings().weight.shape[0]
        # No KV cache in training; it also lets transformers derive block-diagonal masks for packed rows.
        model.config.use_cache = False
        model = method.prepare(model, cfg.method)  # ConfigError (e.g. unknown target module) before any write
        self.p = Prepared(splits, ref, tok, train_feats, val_feats, train_tok, val_tok, method, model, base_sha, vocab)
        return self.p

    def _add_replay(self, splits: Splits, ref: ResolvedModel, tok, base_sha: str) -> None:
        """The base's own answers to general prompts join the training rows (validation stays the task's)."""
        cfg = self.cfg
        rep = replay.build(cfg.data, len(splits.train), cfg.training.seed, tok, base_sha, cache_dir(),
                           lambda: load_model(ref.path, torch.float32, cfg.model.trust_remote_code).to(device()),
                           retention.training_system_prompt(splits.train), cfg.eval.retain_batch_size)
        splits.train = splits.train + rep.examples
        splits.report["replay"] = rep.report
        print(f"replay: {rep.report['rows']} rows of the base's own answers to general prompts "
              f"({'cached' if rep.report['cache_reused'] else 'generated'}; {rep.report['cache']})", flush=True)

    def data_report(self) -> dict[str, Any]:
        p = self.p
        return {**p.splits.report, "tokens": {"train": p.train_tok.__dict__, "validation": p.val_tok.__dict__},
                "packed_rows": len(p.train_feats) if self.cfg.data.packing else None}

    # -- train -------------------------------------------------------------------------------------
    def _write_inputs(self) -> None:
        """config.yaml and data_report.json: the first writes, after setup() validated everything."""
        cfg, rd, p = self.cfg, self.rd, self.p
        if cfg.output.overwrite and rd.root.exists() and not self.resume:
            shutil.rmtree(rd.root)
        rd.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.config, cfg.to_yaml())
        atomic_write_text(rd.data_report, json.dumps(self.data_report(), indent=2) + "\n")
        rep = p.splits.report["train"]
        trunc = p.train_tok.truncated_rows + p.val_tok.truncated_rows
        print(f"data: {p.splits.format}, train {len(p.splits.train)} rows / {p.train_tok.tokens} tokens, "
              f"validation {len(p.splits.validation)}, eval {len(p.splits.eval)}; "
              f"{rep['duplicates_dropped']} duplicates and {rep['empty_rows_dropped']} empty rows dropped; "
              f"{trunc} rows truncated ({p.train_tok.truncated_tokens + p.val_tok.truncated_tokens} tokens)",
              flush=True)

    def _trainer(self) -> Trainer:
        cfg, p = self.cfg, self.p
        callbacks = [reporting.JsonlMetrics(self.rd.metrics_log), *self.trackers.callbacks(),
                     checkpoints.DropPickledArgs()]
        if cfg.training.early_stopping_patience > 0 and p.val_feats:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
        has_val = bool(p.val_feats)
        return p.method.build_trainer(TrainerParts(
            cfg=cfg, model=p.model, tok=p.tok, splits=p.splits, train_feats=p.train_feats, val_feats=p.val_feats,
            callbacks=callbacks, run_dir=self.rd,
            make_args=lambda cls=TrainingArguments, **kw: _training_args(cfg, self.rd, has_val, cls, **kw)))

    def train(self, extra_callbacks: list | None = None) -> Trainer:
        """extra_callbacks: TrainerCallbacks added after the recipe's own (bench/train_speed.py times steps with one)."""
        if self.is_main:
            self._write_inputs()
        self.trackers = tracking.open_trackers(self.cfg, self.rd, self.is_main)
        trainer = self._trainer()
        for cb in extra_callbacks or []:
            trainer.add_callback(cb)
        ckpt = None
        if self.resume:
            ckpt, skipped = checkpoints.resume_point(self.rd)
            if self.is_main:
                checkpoints.discard(skipped, ckpt)
                checkpoints.trim_metrics(self.rd.metrics_log, ckpt.step)
        result = trainer.train(resume_from_checkpoint=str(ckpt.path) if ckpt else None)
        self.out.train_steps, self.out.train_loss = result.global_step, result.training_loss
        return trainer

    # -- save ---------------------------------------------------------------------------------------
    def save(self, trainer: Trainer) -> Path:
        """All ranks call save_model (FSDP gathers shards); rank 0 renames the staging folder into place."""
        method, rd = self.p.method, self.rd
        final = rd.adapter if method.saves_adapter else rd.model
        staging = rd.root / f".staging-{final.name}"
        if trainer.is_world_process_zero() and staging.exists():
            shutil.rmtree(staging)
        trainer.accelerator.wait_for_everyone()
        try:
            trainer.save_model(str(staging))
            trainer.accelerator.wait_for_everyone()
            if trainer.is_world_process_zero():
                (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config is in config.yaml
                if not method.saves_adapter:
                    self.p.tok.save_pretrained(staging)
                with atomic_dir(final, replace=True) as tmp:
                    for f in staging.iterdir():
                        shutil.move(str(f), tmp / f.name)
        finally:  # a full disk mid-save must not leave a hidden half copy of the weights behind
            if trainer.is_world_process_zero():
                shutil.rmtree(staging, ignore_errors=True)
        self.out.train_seconds = time.time() - self.t0
        self.out.peft_config = method.peft_config(trainer.model)
        self.p.model = None  # evaluation reloads the weights from disk: proves what was saved loads
        return final

    # -- evaluate -------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        cfg, p, out = self.cfg, self.p, self.out
        ev: dict[str, Any] = {"eval_set": p.splits.report.get("eval"), "train_seconds": round(out.train_seconds, 1),
                              "train_steps": out.train_steps, "train_loss": out.train_loss}
        if cfg.eval.enabled:
            examples = p.splits.eval[: cfg.eval.max_examples or None]
            tuned = load_run_weights(self.rd, p.ref.path, self._eval_dtype(), merge=True)  # scored as served merged
            ev["tuned"], preds = self._score(tuned, examples)
            preds_base: list[str] = []
            if cfg.eval.compare_base:
                base = load_model(p.ref.path, self._eval_dtype(), cfg.model.trust_remote_code).to(device())
                ev["base"], preds_base = self._score_base(base, examples)
                ev["headline"] = h = reporting.headline(ev["tuned"], ev["base"], len(examples))
                print(f"{h['metric']} on {h['eval_rows']} held-out rows: base {100 * h['base']:.1f} -> tuned "
                      f"{100 * h['tuned']:.1f} ({h['gain_points']:+.1f} points) in {ev['train_seconds']:.0f} s", flush=True)
                if cfg.eval.retention:
                    ev["retention"] = self._retention(tuned, base)
                    reporting.print_retention(ev["retention"])
            atomic_write_text(self.rd.predictions, "".join(
                json.dumps({"where": ex.where, "messages": ex.messages[:-1], "reference": ex.messages[-1]["content"],
                            "tuned": preds[i], "base": preds_base[i] if preds_base else None}) + "\n"
                for i, ex in enumerate(examples)))
        atomic_write_text(self.rd.eval, json.dumps(ev, indent=2) + "\n")
        out.evaluation = ev
        return ev

    def _retention(self, tuned, base) -> dict[str, Any]:
        """Base vs tuned on the general set, with and without the training system prompt; KL(tuned || base)."""
        e, tok = self.cfg.eval, self.p.tok
        items = retention.retain_set(e.retain, e.retain_max_examples)
        conds = retention.conditions(retention.training_system_prompt(self.p.splits.train))
        def ask_base():
            return retention.ask_all(base, tok, items, conds, e.retain_max_new_tokens, e.retain_batch_size)

        # The base's replies are the same for every run on it (greedy): cached by its weights' sha256.
        replies_base = (retention.cached_replies(cache_dir() / "retention", retention.replies_key(
            self.p.base_sha, tok, items, conds, e.retain_max_new_tokens), ask_base) if self.p.base_sha else ask_base())
        replies_tuned = retention.ask_all(tuned, tok, items, conds, e.retain_max_new_tokens, e.retain_batch_size)
        kl = retention.drift_kl(tuned, base, tok, items, replies_base["no_system"], max(1, e.retain_batch_size // 4))
        atomic_write_text(self.rd.retention_predictions, "".join(
            json.dumps(r) + "\n" for r in retention.predictions(items, replies_base, replies_tuned)))
        return retention.report(items, replies_base, replies_tuned, kl, conds)

    def _score_base(self, base, examples) -> tuple[dict[str, Any], list[str]]:
        """The base's scores, reused from an earlier run on the same base, data and settings (train/base_scores.py)."""
        p = self.p
        if not p.base_sha:
            return self._score(base, examples)
        inputs = base_scores.ScoringInputs.of(p.base_sha, p.tok, p.val_feats, examples, p.splits.labels, self.cfg.eval,
                                              p.method.name, self._eval_dtype(), device())
        return base_scores.reused_or_scored(cache_dir() / "base-scores", inputs, p.method,
                                            lambda: self._score(base, examples))

    def _eval_dtype(self) -> torch.dtype:
        return torch.bfloat16 if mixed_precision(self.cfg.model.dtype) == "bf16" else torch.float32

    def _score(self, model, examples) -> tuple[dict[str, Any], list[str]]:
        p, e = self.p, self.cfg.eval
        res, preds = evaluation.score(model, p.tok, p.val_feats, examples, p.splits.labels, e.max_new_tokens,
                                      e.batch_size)
        res.update(p.method.extra_scores(model, p.tok, examples, preds))
        return res, preds

    # -- record: everything after evaluation, manifest.json last ---------------------------------------
    def record(self) -> Manifest:
        cfg, p, rd, out = self.cfg, self.p, self.rd, self.out
        if cfg.output.merge and p.method.saves_adapter:
            merge_run_adapter(rd.root, p.ref.path, rd.model)
        reporting.plot_losses(rd.metrics_log, rd.plot)
        serv = servability(out.peft_config) if p.method.saves_adapter else {
            "vllm": {"ok": True, "reasons": [], "as": "base model (full weights in model/)"},
            "flask": {"ok": True, "reasons": [], "as": "base model (full weights in model/)"}}
        atomic_write_text(rd.model_card, reporting.model_card(rd, cfg.to_dict(), out.evaluation, self.data_report(), serv))
        ev = out.evaluation
        manifest = Manifest(
            kind="run", name=rd.root.name, method=cfg.method.name,
            base_model={"name": p.ref.name, "source": p.ref.source, "path": p.ref.path, "sha256": p.base_sha,
                        "architecture": architecture_name(p.ref.path), "vocab_size": p.vocab_size},
            peft_config=out.peft_config, dataset=p.splits.report, servability=serv,
            metrics={"headline": ev.get("headline"), "tuned": ev.get("tuned"), "base": ev.get("base"),
                     "retention": reporting.retention_summary(ev.get("retention"))})
        for folder in (rd.adapter, rd.model):
            if folder.is_dir():
                manifest.files.update({f"{folder.name}/{k}": v for k, v in file_checksums(folder).items()})
        manifest.record_files(rd.root, ["config.yaml", "eval.json", "data_report.json"])
        manifest.write(rd.root)  # last: its presence marks the run finished
        self.trackers.log_evaluation(ev, manifest.metrics, cfg.publish)  # the same runs as the step metrics
        return manifest

    def publish(self) -> Path | None:
        reg = self.cfg.output.registry
        if not reg:
            return None
        name, pub = self.cfg.output.adapter_name or self.rd.root.name, self.cfg.publish
        path = Registry(reg).publish_run(self.rd.root, name, gate=pub.policy(), override_gate=pub.override_gate,
                                         keep=pub.keep_versions)
        gate = Manifest.read(path).extra["gate"]
        note = f"gate REFUSED, overridden: {gate['override_reason']}" if gate["forced"] else "gate passed"
        print(f"published {name!r} as {path.name} ({note}) to {path.parent}; it serves as {name!r} and {path.name!r}",
              flush=True)
        return path


def run(cfg: Config, resume: bool = False) -> RunDir:
    recipe = FineTuneRecipe(cfg, resume)
    complete = False  # the trackers' runs end FINISHED once the run is recorded (a refused publish included)
    try:
        if _train_and_record(recipe):
            complete = True
            _publish(recipe)
    finally:
        recipe.trackers.finish(complete)
    return recipe.rd


def _train_and_record(recipe: FineTuneRecipe) -> bool:
    """setup -> train -> save -> evaluate -> record; False on the torchrun ranks other than 0 (they stop after save)."""
    rd = recipe.rd
    unfinished = f" (the run {rd.root} is unfinished; fix the cause, then --resume continues from its last checkpoint, if any)"
    with writing(rd.root, unfinished):
        recipe.setup()
        trainer = recipe.train()
        recipe.save(trainer)
        if not trainer.is_world_process_zero():
            return False
        del trainer
        recipe.evaluate()
        recipe.record()
    return True


def _publish(recipe: FineTuneRecipe) -> None:
    rd, reg = recipe.rd, recipe.cfg.output.registry
    try:
        with writing(reg or rd.root, f" (nothing was published; the run is complete: {rd.root})"):
            recipe.publish()
    except (GateRefused, RegistryError) as e:
        hint = "; data.replay keeps general skills" if "retention dropped" in str(e) else ""
        raise UserError(f"{e}{hint} (the run is complete: {rd.root})") from None
