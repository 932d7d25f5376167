"""What data a run trains and is scored on: the `data` and `eval` sections of a run's config.

Training reads them from its YAML config; export's int8 quality gate reads the same sections back
from the run's resolved config.yaml, so both score on exactly the same rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from lm.errors import ConfigError
from lm.options import opt


@dataclass
class DataConfig:
    train: str = opt("demo_data/chef_train.jsonl", "bundled demo: a fictional restaurant's menu the base model cannot know "
                     "(a relative default is inside the train package; see train/bundled.py)")
    format: str = opt("auto", "auto-detects chat / instruction / prompt_completion / classification from the fields")
    validation: str | None = opt(None, "None = split validation_fraction off the training file")
    validation_fraction: float = opt(0.05, "small split: enough for a stable loss, leaves most rows for training")
    eval: str | None = opt("demo_data/chef_heldout.jsonl", "held-out questions in unseen phrasings for task metrics; None = use validation")
    labels: list[str] = opt([], "classification labels; empty = inferred from the training file")
    text_field: str = opt("text", "classification input column")
    label_field: str = opt("label", "classification label column")
    system_prompt: str | None = opt(None, "added to rows that have none; None keeps rows as they are")
    max_length: int = opt(512, "longer rows are truncated (and reported); 512 covers chat QA rows")
    packing: bool = opt(False, "pack short rows into max_length blocks (padding-free); off keeps batches simple")
    pad_to_multiple_of: int | None = opt(None, "8 helps GPU tensor cores; None avoids useless padding on CPU")
    replay: float = opt(0.0, "add this fraction of the training rows as the base model's own answers to general prompts (keeps it a chat model; the demo uses 0.15); 0 = off")
    replay_prompts: str | None = opt(None, "your own prompts (JSONL rows with a prompt) to replay beside the bundled general ones")
    replay_max_new_tokens: int = opt(48, "the base's replay answers are short; longer ones cost generation time once")


@dataclass
class EvalConfig:
    enabled: bool = opt(True, "every run scores base vs tuned; turn off only for quick experiments")
    max_new_tokens: int = opt(32, "answers in the demo are a few words; raise for long generations")
    batch_size: int = opt(16, "generation batch; larger is faster until memory runs out")
    max_examples: int = opt(0, "0 = all rows of the eval set")
    compare_base: bool = opt(True, "score the untouched base model too, so the gain is visible")
    retention: bool = opt(True, "score base and tuned on the bundled general set too: the gate refuses a model that forgot")
    retain: str | None = opt(None, "your own general prompts (JSONL prompt + answers), scored beside the bundled set")
    retain_max_examples: int = opt(0, "0 = the whole bundled set; a cap (spread over all categories) for quick runs")
    retain_max_new_tokens: int = opt(24, "general answers are a few words; enough for 'The capital of France is Paris.'")
    retain_batch_size: int = opt(64, "short prompts: batches of 64 generate 2.2x faster than 16 on a CPU (measured)")


@dataclass
class RunData:
    """The data a finished run was trained and scored on, read back from its config.yaml."""

    data: DataConfig
    eval: EvalConfig
    seed: int

    @classmethod
    def from_config_yaml(cls, path: Path) -> "RunData":
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            return cls(_section(DataConfig, raw.get("data")), _section(EvalConfig, raw.get("eval")),
                       int((raw.get("training") or {}).get("seed", 0)))
        except (OSError, yaml.YAMLError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable run config: {e}".splitlines()[0]) from None


def _section(cls, values: dict | None):
    """A dataclass from a resolved config section; fields this version does not know are ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in known})
