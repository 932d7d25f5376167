"""Training configuration: one dataclass per YAML section; every default carries its reason.

The `data` and `eval` sections are the core's (lm/data/config.py): export reads them back from a
run's config.yaml for its quality gate.

YAML file -> sections below; `section.field=value` overrides on the command line win.
`tunestack train --help` prints this table.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm.data.config import DataConfig, EvalConfig
from lm.errors import ConfigError
from lm.options import opt
from train import bundled


@dataclass
class ModelConfig:
    name_or_path: str = opt("embedded:smollm2-135m-instruct", "the bundled default runs offline; any local HF folder or hub id works")
    dtype: str = opt("auto", "auto = bf16 on a bf16-capable GPU, fp32 on CPU (CPU bf16 is slow and lossy)")
    trust_remote_code: bool = opt(False, "executing model-repo code is opt-in for security")
    attn_implementation: str = opt("sdpa", "PyTorch's fused attention: fastest choice that needs no extra package")


# The methods train/methods/ implements, by name (its table is tested equal). The config names them and never
# imports them: a method imports the config types, so the reverse import would close a circle.
METHOD_NAMES = ("lora", "dora", "ia3", "prompt_tuning", "full", "qlora", "distill", "dpo", "orpo", "grpo")


@dataclass
class MethodConfig:
    name: str = opt("lora", f"{' | '.join(METHOD_NAMES)}; LoRA is the cheapest that serves multi-adapter")
    r: int = opt(16, "rank 16: enough capacity for new facts; a rank every vLLM build accepts")
    alpha: int = opt(32, "alpha = 2r, the common scaling")
    dropout: float = opt(0.05, "light regularisation for small datasets")
    target_modules: Any = opt("all-linear", "all linear layers learn facts far better than q/v only; or a list of names")
    num_virtual_tokens: int = opt(20, "prompt tuning: soft prompt length")
    prompt_init_text: str | None = opt(None, "prompt tuning: initialise the soft prompt from this text (None = random)")
    feedforward_modules: list[str] = opt([], "ia3: which target modules are feed-forward (scaled on input); empty = auto")
    # distill: a teacher's soft labels train the student (model.name_or_path)
    teacher: str | None = opt(None, "distill: a local model folder or a finished run (full or LoRA, merged in memory)")
    student: str = opt("lora", "distill: train the student with lora or full; full is required with student_layers")
    student_layers: str = opt("", "distill: keep these layers of model.name_or_path, 'every_other' or '0,2,4'; '' = all")
    temperature: float = opt(2.0, "distill: softens both distributions so the teacher's ranking of wrong tokens teaches too")
    distill_alpha: float = opt(0.5, "distill: loss = alpha*T^2*KL + (1-alpha)*CE; 0.5 weighs teacher and data equally")
    distill_mode: str = opt("offline", "distill: offline caches the teacher's top-k once (teacher not in memory while training); online runs it beside the student")
    top_k: int = opt(32, "distill offline: teacher log-probs kept per token; 32 holds nearly all the mass of a chat model")
    teacher_cache: str | None = opt(None, "distill offline: folder for the teacher cache, shareable across runs; None = <run>/teacher_cache")
    on_policy: float = opt(0.0, "distill online: fraction of steps on the student's own samples (TRL GKD); 0 = off-policy")
    # preference (dpo, orpo) and RL (grpo)
    beta: float = opt(0.1, "dpo: strength of the pull to the reference; orpo: odds-ratio weight; 0.1 is both papers' default")
    rewards: list[str] = opt(["keyword"], "grpo: reward functions, summed: json_schema:PATH, regex:PATTERN, exact, keyword, length:N, or module.path:function")
    num_generations: int = opt(4, "grpo: samples per prompt; the group its advantages are relative to")
    max_completion_length: int = opt(48, "grpo: tokens sampled per completion; the demo answers are short JSON")
    kl_beta: float = opt(0.04, "grpo: weight of the KL to the reference policy (DeepSeekMath's value); 0 skips the reference")


# The experiment trackers training.report_to accepts, through transformers' own callbacks (train/tracking.py).
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class TrainingConfig:
    epochs: float = opt(3.0, "three passes over a small dataset; max_steps overrides")
    max_steps: int = opt(-1, "-1 = derive from epochs")
    batch_size: int = opt(8, "per device; fits CPU RAM and small GPUs")
    grad_accum: int = opt(1, "raise to reach a larger effective batch without memory")
    lr: float = opt(2e-4, "standard LoRA rate; full fine-tuning wants ~1e-5")
    lr_scheduler: str = opt("cosine", "cosine decay settles the facts learned late in training")
    warmup_ratio: float = opt(0.05, "short warmup avoids early divergence")
    weight_decay: float = opt(0.0, "no decay: adapters are small and runs are short")
    max_grad_norm: float = opt(1.0, "clip spikes from rare long rows")
    gradient_checkpointing: bool = opt(False, "trades ~30% speed for memory; off for small models")
    group_by_length: bool = opt(False, "batch rows of similar length (less padding); on when lengths vary a lot, e.g. with data.replay")
    seed: int = opt(0, "fixed seed: same data split, init and order every run")
    eval_steps: int = opt(50, "validation loss every N steps (early stopping reads it)")
    early_stopping_patience: int = opt(0, "stop after N evals without val-loss improvement; 0 = off")
    save_steps: int = opt(50, "checkpoint every N steps so --resume loses little")
    save_total_limit: int = opt(2, "keep the last checkpoints only; they are large for full fine-tuning")
    logging_steps: int = opt(5, "train loss every N steps to JSONL and the report_to trackers")
    report_to: list[str] = opt(["tensorboard"], f"trackers for the step metrics and the evaluation: {' | '.join(TRACKERS)} "
                               "or none (a list or comma string); TensorBoard needs no server and writes into the run")
    fsdp: str = opt("", "e.g. 'full_shard auto_wrap' for full fine-tuning across GPUs under torchrun; '' = DDP")
    ddp_bucket_mb: int = opt(0, "DDP's gradient bucket size under torchrun; 0 = torch's 25 MB")
    ddp_static_graph: bool = opt(True, "the step uses every trainable parameter every time, so DDP may fix its reduction "
                                 "order after the first step and overlap it with the backward (off for prompt tuning)")
    num_threads: int = opt(0, "CPU threads for torch; 0 = torch's default (all cores)")
    fast_path: str = opt("auto", "auto = on: the fused padding-free step (train/fast) for Llama/Qwen2/Mistral LoRA and full "
                         "fine-tuning on CUDA and CPU (1.23x a demo step on 2 cores), the transformers forward otherwise; off = never")
    compile: str = opt("auto", "torch.compile of the fused step: auto = on CUDA (on a CPU the compile costs more than it saves "
                       "at demo size); on | off")
    cuda_graphs: str = opt("auto", "auto = replay the fused step's decoder stack from CUDA graphs wherever it runs on CUDA "
                           "(not with gradient checkpointing): most of its LoRA speed-up; off = eager launches (A/B, escape hatch)")
    shared_prefix: str = opt("auto", "the fused step computes the tokens all rows of a batch open with (a fixed system prompt) "
                             "once: auto = on a CPU (demo steps 1.39x), off on CUDA, where it would leave flash varlen "
                             "attention and the CUDA graphs; on | off")


ON_OFF = ("fast_path", "compile", "shared_prefix")  # auto | on | off settings
AUTO_OFF = ("cuda_graphs",)  # auto | off settings: nothing to force where no CUDA device is


@dataclass
class OutputConfig:
    dir: str = opt("runs/chef-lora", "run directory; it must not exist unless resuming or overwrite=true")
    overwrite: bool = opt(False, "refuse to clobber a finished run by accident")
    merge: bool = opt(False, "also write merged full weights (model/) for engines without LoRA")
    registry: str | None = opt(None, "publish the adapter into this registry folder when the run succeeds")
    adapter_name: str | None = opt(None, "registry name; None = the run directory's name")


@dataclass
class TrackingConfig:
    """Where training.report_to's MLflow and W&B runs go; an unset field leaves it to that library's own variable."""

    experiment: str | None = opt(None, "MLflow experiment and W&B project; None = MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, "
                                 "else 'tunestack': every run of this stack side by side")
    run_name: str | None = opt(None, "the run's name in the trackers; None = the run directory's name, as in the registry")
    mlflow_uri: str | None = opt(None, "MLflow tracking server, e.g. http://mlflow:5000; None = MLFLOW_TRACKING_URI (one of "
                                 "the two is needed: MLflow 3 keeps runs in a server's database, not in files)")


@dataclass
class PublishConfig:
    """The gate every publish passes (tunestack registry publish, the auto-publish above, export all --registry)."""

    min_gain: float = opt(1.0, "points the task metric must beat the base by: an adapter that learnt nothing is not shipped")
    max_retention_drop: float = opt(10.0, "points of general-set accuracy (eval.retention) the tuned model may lose vs its base")
    override_gate: str | None = opt(None, "a reason to publish although the gate refuses (recorded in the manifest and card); unset: the gate decides")
    keep_versions: int = opt(5, "versions kept per name (older ones pruned, never the one served): enough to roll back")

    def policy(self):
        from artifacts import GatePolicy

        return GatePolicy(self.min_gain, self.max_retention_drop)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {name: typing.get_type_hints(Config)[name] for name in SECTIONS}


def _coerce(section: str, key: str, value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint) or hint is Any:
            return None
        raise ConfigError(f"{where}: {section}.{key}: must not be null")
    if hint is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        hint = args[0]
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            if isinstance(value, bool) and key in ON_OFF + AUTO_OFF:  # YAML 1.1 reads a bare on/off as a boolean
                return "on" if value else "off"
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if not value.startswith("[") else yaml.safe_load(value)
            if not isinstance(value, list):
                raise ValueError(value)
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {section}.{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def _apply(cfg: Config, section: str, values: dict[str, Any], where: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: {section}: unknown section; known: {', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {section}: expected a mapping of fields")
    _apply_to(getattr(cfg, section), section, values, where)


def _apply_to(obj, section: str, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}: {section}.{key}: unknown field; known: {', '.join(hints)}")
        setattr(obj, key, _coerce(section, key, value, hints[key], where))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    bundled.resolve_defaults(cfg)
    if path is not None:
        path = bundled.config_file(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in bundled.resolve_file_paths(raw, path).items():
            _apply(cfg, section, values or {}, str(path))
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"override {ov!r}: expected section.field=value")
        key, value = ov.split("=", 1)
        section, name = key.split(".", 1)
        _apply(cfg, section, {name: yaml.safe_load(value) if value else ""}, "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every check that needs only the config types; the method's own (train.methods.check_config) run in setup."""
    where = "config"
    if cfg.method.name not in METHOD_NAMES:
        raise ConfigError(f"{where}: method.name: {cfg.method.name!r} unknown; choose from {', '.join(METHOD_NAMES)}")
    if cfg.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: model.dtype: {cfg.model.dtype!r}; choose auto, float32, bfloat16, float16")
    if cfg.data.format not in ("auto", "chat", "instruction", "prompt_completion", "classification", "preference"):
        raise ConfigError(f"{where}: data.format: {cfg.data.format!r} unknown")
    if not 0.0 <= cfg.data.validation_fraction < 0.5:
        raise ConfigError(f"{where}: data.validation_fraction: must be in [0, 0.5)")
    for name in ("batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps"):
        if getattr(cfg.training, name) < 1:
            raise ConfigError(f"{where}: training.{name}: must be >= 1")
    if cfg.training.lr <= 0:
        raise ConfigError(f"{where}: training.lr: must be > 0")
    for name in ON_OFF:
        if getattr(cfg.training, name) not in ("auto", "on", "off"):
            raise ConfigError(f"{where}: training.{name}: {getattr(cfg.training, name)!r}; choose auto, on, off")
    for name in AUTO_OFF:
        if getattr(cfg.training, name) not in ("auto", "off"):
            raise ConfigError(f"{where}: training.{name}: {getattr(cfg.training, name)!r}; choose auto, off")
    if not 0.0 <= cfg.data.replay <= 4.0:
        raise ConfigError(f"{where}: data.replay: must be in [0, 4] (a fraction of the training rows)")
    if cfg.data.replay > 0 and cfg.method.name in ("dpo", "orpo", "grpo"):
        raise ConfigError(f"{where}: data.replay: not for {cfg.method.name} (replay rows are plain answers, "
                          "not preference pairs or prompts to sample); use it with supervised methods")
    _validate_report_to(cfg.training)
    if cfg.publish.keep_versions < 1:
        raise ConfigError(f"{where}: publish.keep_versions: must be >= 1")
    if cfg.data.max_length < 8:
        raise ConfigError(f"{where}: data.max_length: must be >= 8")
    if cfg.method.r < 1:
        raise ConfigError(f"{where}: method.r: must be >= 1")
    tm = cfg.method.target_modules
    if not (tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm))):
        raise ConfigError(f"{where}: method.target_modules: 'all-linear' or a non-empty list of module names")


def _validate_report_to(t: TrainingConfig) -> None:
    """One spelling: lower-case tracker names; `none` alone turns every tracker off (metrics.jsonl stays)."""
    names = [n.strip().lower() for n in t.report_to if n.strip()]
    bad = [n for n in names if n not in (*TRACKERS, "none")]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ConfigError(f"config: training.report_to: {', '.join(t.report_to) or 'empty'}: choose "
                          f"{', '.join(TRACKERS)} (several: a list or comma string), or none")
    t.report_to = list(dict.fromkeys(names))


def section_from_yaml(path: Path, section: str, cls):
    """One section of a run's resolved config.yaml (defaults for what it lacks: runs from older versions)."""
    if not Path(path).is_file():
        return cls()
    try:
        raw = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get(section) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable run config: {e}".splitlines()[0]) from None
    obj = cls()
    _apply_to(obj, section, raw, str(path))
    return obj


def help_text() -> str:
    lines = ["Config fields (YAML section.field, or section.field=value on the command line):", ""]
    for section, cls in _SECTION_TYPES.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} = {default!r}")
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
