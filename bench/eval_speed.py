"""A run's evaluation with the tuned LoRA merged for scoring vs kept as base + adapter (same run, alternating).

What `train` evaluates after training on a CPU: the retention set's generations (both conditions) and the
KL(tuned || base) pass over the base's replies. Each arm loads the run's weights as the recipe does
(`lm.loading.load_run_weights(..., merge=...)`); base replies are computed once. Prints per arm the mean ± sd
of generation and KL seconds over the runs, the ratio, and whether both arms agree (replies, KL).

  python bench/eval_speed.py RUN_DIR --base PATH [--items 60] [--runs 2] [--threads 1] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished LoRA run directory (with adapter/)")
    ap.add_argument("--base", required=True, help="the base model folder the run was trained on")
    ap.add_argument("--items", type=int, default=60, help="retention prompts (spread over the categories); 0 = all")
    ap.add_argument("--runs", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CI evaluates at 1)")
    ap.add_argument("--train-data", type=Path, default=Path(__file__).resolve().parents[1] / "train" / "demo_data" /
                    "chef_train.jsonl", help="the run's training rows: their system prompt is the second condition")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    a = ap.parse_args()

    import torch

    from artifacts import RunDir
    from lm import retention
    from lm.data.config import EvalConfig
    from lm.data.formats import detect_format, read_rows, to_example
    from lm.loading import load_model, load_run_weights, load_tokenizer

    torch.set_num_threads(a.threads)
    e, rd, tok = EvalConfig(), RunDir(a.run), load_tokenizer(a.base)
    items = retention.retain_set(None, a.items)
    train_rows = [to_example(row, detect_format(row, str(i)), str(i)) for i, row in read_rows(a.train_data)]
    conds = retention.conditions(retention.training_system_prompt(train_rows))
    base = load_model(a.base, torch.float32).eval()
    base_replies = retention.ask_all(base, tok, items, conds, e.retain_max_new_tokens, e.retain_batch_size)
    times: dict[str, dict[str, list[float]]] = {"adapter": {"gen": [], "kl": []}, "merged": {"gen": [], "kl": []}}
    outputs: dict[str, tuple] = {}
    for _ in range(a.runs):
        for arm in ("adapter", "merged"):
            tuned = load_run_weights(rd, a.base, torch.float32, merge=arm == "merged").eval()
            t = time.perf_counter()
            replies = retention.ask_all(tuned, tok, items, conds, e.retain_max_new_tokens, e.retain_batch_size)
            t_gen = time.perf_counter()
            kl = retention.drift_kl(tuned, base, tok, items, base_replies["no_system"], max(1, e.retain_batch_size // 4))
            times[arm]["gen"].append(t_gen - t)
            times[arm]["kl"].append(time.perf_counter() - t_gen)
            outputs[arm] = (replies, kl)
            print(f"{arm}: generation {times[arm]['gen'][-1]:.1f} s, KL {times[arm]['kl'][-1]:.1f} s (KL {kl:.4f})",
                  flush=True)
    report = _report(a, times, outputs, len(items), len(conds))
    print(json.dumps(report["summary"], indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")


def _report(a, times, outputs, n_items: int, n_conds: int) -> dict:
    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.1f}"

    total = {arm: [g + k for g, k in zip(t["gen"], t["kl"])] for arm, t in times.items()}
    (ra, ka), (rm, km) = outputs["adapter"], outputs["merged"]
    same = sum(x == y for c in ra for x, y in zip(ra[c], rm[c]))
    summary = {"prompts": n_items, "conditions": n_conds, "runs_per_arm": a.runs, "threads": a.threads,
               "cpu": platform.processor() or platform.machine(), "os_cpus": os.cpu_count(),
               **{f"{arm}_{part}_s": ms(t[part]) for arm, t in times.items() for part in ("gen", "kl")},
               "speedup_total": round(statistics.mean(total["adapter"]) / statistics.mean(total["merged"]), 2),
               "speedup_kl": round(statistics.mean(times["adapter"]["kl"]) / statistics.mean(times["merged"]["kl"]), 2),
               "same_replies": f"{same}/{n_items * n_conds}", "kl_adapter": ka, "kl_merged": km}
    return {"summary": summary, "times": times}


if __name__ == "__main__":
    main()
