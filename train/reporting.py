"""What a run reports while and after it trains: metrics JSONL, loss plot, model card."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from artifacts import RunDir
from lm import evaluation


class JsonlMetrics(TrainerCallback):
    """Appends every Trainer log (train loss, lr, eval loss...) as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}) + "\n")


class TensorBoard(TensorBoardCallback):
    """transformers' TensorBoard logging into the run's logs/tensorboard, given here rather than read from the
    process environment (TENSORBOARD_LOGGING_DIR), which a run must not change for the rest of the process."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.logging_dir = str(log_dir)


def headline(tuned: dict[str, Any], base: dict[str, Any], rows: int) -> dict[str, Any]:
    """The run's headline: its task metric, base vs tuned, and the gain in points."""
    head = evaluation.headline_metric(tuned)
    return {"metric": head, "base": base[head], "tuned": tuned[head],
            "gain_points": 100 * (tuned[head] - base[head]), "eval_rows": rows}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


EXTRA_CURVES = ("reward", "kl", "distill_kl", "distill_ce", "rewards/chosen", "rewards/margins")  # RL, distill, DPO


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Train/validation loss, plus a second panel for the method's own curves (reward, KL, margins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    curves = {name: [(r["step"], r[key]) for r in rows if key in r]
              for name, key in (("train loss", "loss"), ("validation loss", "eval_loss"))}
    extras = {k: [(r["step"], r[k]) for r in rows if k in r] for k in EXTRA_CURVES}
    extras = {k: v for k, v in extras.items() if v}
    if not any(curves.values()):
        return None
    fig, axes = plt.subplots(1, 2 if extras else 1, figsize=(12 if extras else 7, 4), squeeze=False)
    ax = axes[0][0]
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), label=name, marker="o" if name.startswith("validation") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for pts in curves.values() for _, v in pts):
        ax.set_yscale("log")  # DPO/GRPO losses can be <= 0: linear there
    ax.grid(alpha=0.3)
    ax.legend()
    if extras:
        for name, pts in extras.items():
            axes[0][1].plot(*zip(*pts), label=name)
        axes[0][1].set_xlabel("step")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def retention_summary(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the manifest keeps of the retention report (eval.json has it all): what the gate and serving read."""
    if not r:
        return None
    return {k: r[k] for k in ("base", "tuned", "drop_points", "kl", "rows")} | {
        "conditions": {c: {"base": v["base"], "tuned": v["tuned"]} for c, v in r["conditions"].items()}}


def print_retention(r: dict[str, Any]) -> None:
    conds = ", ".join(f"{c} {100 * v['base']:.1f} -> {100 * v['tuned']:.1f} %" for c, v in r["conditions"].items())
    print(f"retention on {r['rows']} general prompts: {100 * r['base']:.1f} -> {100 * r['tuned']:.1f} % "
          f"(drop {r['drop_points']:.1f} points; {conds}); KL(tuned || base) "
          f"{'n/a' if r['kl'] is None else format(r['kl'], '.3f')} nats/token", flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _retention_lines(r: dict | None, replay: dict | None, publish: dict) -> list[str]:
    """What the tuned model kept of the base's general skills, and the gate it must pass to publish."""
    out = ["", "## Retention (general prompts)", ""]
    if not r:
        return out + ["Not measured (eval.retention off, or no base comparison): the publish gate will refuse it.", ""]
    out += [f"{r['rows']} general prompts (facts, arithmetic, instructions, refusals, chat), asked "
            + " and ".join(r["conditions"]) + ": accuracy base "
            f"{100 * r['base']:.1f} % -> tuned {100 * r['tuned']:.1f} % (drop {r['drop_points']:.1f} points); "
            + ("" if r["kl"] is None else f"KL(tuned || base) {r['kl']:.3f} nats/token."), "",
            "| category | base | tuned |", "|---|---|---|"]
    out += [f"| {c} | {100 * v['base']:.1f} % | {100 * v['tuned']:.1f} % |" for c, v in r["by_category"].items()]
    if replay:
        out += ["", f"Replay: {replay['rows']} rows of the base model's own answers to general prompts mixed in "
                    f"(data.replay {replay['fraction']})."]
    if publish:
        out += ["", f"Publish gate: task gain >= {publish.get('min_gain')} points, retention drop <= "
                    f"{publish.get('max_retention_drop')} points."]
    return out


def model_card(rd: RunDir, cfg: dict, evaluation: dict, data_report: dict, servability: dict) -> str:
    lines = [f"# {rd.root.name}", "",
             f"Fine-tuned from `{cfg['model']['name_or_path']}` with **{cfg['method']['name']}**.", ""]
    if cfg["method"]["name"] in ("lora", "dora"):
        lines.append(f"LoRA rank {cfg['method']['r']}, alpha {cfg['method']['alpha']}, "
                     f"targets `{cfg['method']['target_modules']}`.")
        lines.append("")
    tr = data_report.get("train", {})
    lines += ["## Data", "", f"- train: `{tr.get('path')}`: {tr.get('rows_used')} rows used "
              f"({tr.get('duplicates_dropped', 0)} duplicates and {tr.get('empty_rows_dropped', 0)} empty rows dropped)",
              f"- eval: {evaluation.get('tuned', {}).get('eval_rows', 0)} held-out rows", "", "## Metrics", "",
              "| metric | base | tuned |", "|---|---|---|"]
    base, tuned = evaluation.get("base", {}), evaluation.get("tuned", {})
    for k, v in tuned.items():
        if isinstance(v, (int, float)):
            lines.append(f"| {k} | {_fmt(base.get(k, '-'))} | {_fmt(v)} |")
    lines += _retention_lines(evaluation.get("retention"), data_report.get("replay"), cfg.get("publish", {}))
    vl = servability.get("vllm", {})
    lines += ["", "## Serving", ""]
    if not cfg["method"]["name"] in ("lora", "dora", "ia3", "prompt_tuning"):
        lines.append("Full weights in `model/`: serve them as a base model (vLLM or Flask).")
    elif vl.get("ok"):
        lines.append(f"vLLM: servable; start the server with `--enable-lora --max-lora-rank {vl['max_lora_rank']}`.")
    else:
        lines.append("vLLM: not servable as an adapter: " + "; ".join(vl.get("reasons", [])))
    lines += ["", "Publish it into a registry and serve it:", "", "```",
              f"tunestack registry publish {rd.root} --registry registry",
              "tunestack registry list --registry registry", "```", ""]
    return "\n".join(lines)
