"""Which checkpoint --resume continues from, and what the run's own files must say to continue it.

The Trainer writes a checkpoint folder file by file (weights, optimizer, scheduler, RNG state, then
trainer_state.json), none of it atomically: a kill -9 or a full disk can leave checkpoint-N with any
prefix of those files, or a truncated trainer_state.json. HF then resumes from it anyway and silently
starts a fresh optimizer or RNG when a file is missing. So --resume takes the newest checkpoint whose
every file is present and whose state parses, says which newer ones it skipped and why, and removes
them (the Trainer would otherwise write into the same folder when it reaches that step again).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from artifacts import RunDir, atomic_write_text
from lm.errors import ConfigError

WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",  # never a .bin pickle
           "pytorch_model_fsdp_0")  # FSDP's sharded state (torch.distributed.checkpoint), under torchrun
# HF's formats; the Trainer torch.loads them with weights_only=True. Under FSDP the optimizer is sharded.
STATE = {"optimizer": ("optimizer.pt", "optimizer.bin", "optimizer_0"), "scheduler": ("scheduler.pt",)}
# Settings a resumed run may change: they decide when it stops, logs or saves, not the trajectory it follows.
RESUME_MAY_CHANGE = {"training": {"max_steps", "epochs", "eval_steps", "save_steps", "save_total_limit",
                                  "logging_steps", "early_stopping_patience", "num_threads", "report_to"},
                     "eval": None, "output": None, "tracking": None, "publish": None}  # None: the whole section


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def step_of(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def _present(p: Path) -> bool:
    """A non-empty file, or a non-empty folder (FSDP shards)."""
    if p.is_dir():
        return any(p.iterdir())
    return p.is_file() and p.stat().st_size > 0


def incomplete(path: Path, step: int) -> str | None:
    """Why `path` cannot be resumed from, or None when every file a resume reads is there and parses."""
    if not any(_present(path / w) for w in WEIGHTS):
        return f"no safetensors weights ({' or '.join(WEIGHTS[:2])})"
    for names in STATE.values():
        if not any(_present(path / n) for n in names):
            return f"no {names[0]}"
    if not any(p.stat().st_size > 0 for p in path.glob("rng_state*.pth")):
        return "no rng_state.pth"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as e:
        return f"unreadable trainer_state.json ({type(e).__name__})"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json is for step {state.get('global_step') if isinstance(state, dict) else '?'}"
    return None


def resume_point(rd: RunDir) -> tuple[Checkpoint, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and the newer incomplete ones with the reason each is skipped."""
    found = sorted(((s, p) for p in rd.checkpoints.glob("checkpoint-*") if p.is_dir() and (s := step_of(p)) is not None),
                   reverse=True) if rd.checkpoints.is_dir() else []
    skipped: list[tuple[Path, str]] = []
    for step, path in found:
        why = incomplete(path, step)
        if why is None:
            return Checkpoint(path, step), skipped
        skipped.append((path, why))
    detail = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise ConfigError(f"{rd.checkpoints}: no complete checkpoint to resume from" + (f" ({detail})" if detail else ""))


def discard(skipped: list[tuple[Path, str]], resume_from: Checkpoint) -> None:
    """Say which checkpoints a resume skips, and remove them: the Trainer would write into them again."""
    for bad, reason in skipped:
        print(f"note: {bad} is incomplete ({reason}; a save cut short): removed, resuming from "
              f"{resume_from.path.name}", flush=True)
        shutil.rmtree(bad, ignore_errors=True)


def check_same_run(rd: RunDir, cfg_dict: dict[str, Any], data_report: dict[str, Any]) -> None:
    """A resume must continue the same run: same model, data, method and optimisation settings."""
    try:
        before = yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}
        old_report = json.loads(rd.data_report.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{rd.root}: cannot resume: its config.yaml or data_report.json is unreadable "
                          f"({type(e).__name__})") from None
    changed = [f"{sec}.{k}" for sec, values in cfg_dict.items() if RESUME_MAY_CHANGE.get(sec, set()) is not None
               for k, v in values.items()
               if k not in (RESUME_MAY_CHANGE.get(sec) or set()) and (before.get(sec) or {}).get(k) != v]
    for split in ("train", "validation"):  # the eval set is scored after training: it may change
        old, new = (old_report.get(split) or {}).get("sha256"), (data_report.get(split) or {}).get("sha256")
        if old != new:
            changed.append(f"{split} data (sha256 {str(old)[:12]} -> {str(new)[:12]})")
    if changed:
        raise ConfigError(f"{rd.root}: --resume would continue a different run: {', '.join(changed)} changed; "
                          "start a new output.dir instead")


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (the killed run logged them; the resume logs them again)
    and a last line cut short by the kill. Rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class DropPickledArgs(TrainerCallback):
    """The Trainer pickles its TrainingArguments into every checkpoint (training_args.bin). A resume never
    reads it and config.yaml holds the resolved settings, so checkpoints keep no pickle at all."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)
