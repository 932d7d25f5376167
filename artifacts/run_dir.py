"""Run directory layout: one place that names every file a training run writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from artifacts.manifest import MANIFEST_NAME


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")  # resolved config, all defaults filled in
    manifest = property(lambda self: self.root / MANIFEST_NAME)  # written last: its presence means "finished"
    adapter = property(lambda self: self.root / "adapter")  # PEFT format: adapter_config.json + adapter_model.safetensors
    model = property(lambda self: self.root / "model")  # full weights: full fine-tuning, or merged adapter
    eval = property(lambda self: self.root / "eval.json")  # base vs tuned metrics
    predictions = property(lambda self: self.root / "eval_predictions.jsonl")  # per-example generations
    retention_predictions = property(lambda self: self.root / "retention_predictions.jsonl")  # general set: base vs tuned
    data_report = property(lambda self: self.root / "data_report.json")  # cleaning/truncation counts
    model_card = property(lambda self: self.root / "README.md")
    logs = property(lambda self: self.root / "logs")
    metrics_log = property(lambda self: self.root / "logs" / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "logs" / "tensorboard")
    plot = property(lambda self: self.root / "plots" / "loss.png")
    checkpoints = property(lambda self: self.root / "checkpoints")

    def is_finished(self) -> bool:
        return self.manifest.is_file()

    def last_checkpoint(self) -> Path | None:
        """Newest *complete* checkpoint. The Trainer writes trainer_state.json after the weights, optimizer,
        scheduler and RNG state, so a run killed mid-save leaves a newer folder without it: skipped."""
        if not self.checkpoints.is_dir():
            return None
        cks = [p for p in self.checkpoints.glob("checkpoint-*")
               if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
        return max(cks, key=lambda p: int(p.name.split("-")[-1]), default=None)
