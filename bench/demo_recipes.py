"""Screen demo recipes (issue 27): held-out menu accuracy, retention per condition and category, KL, over seeds.

Each recipe trains LoRA on the demo data (train/demo_data/chef_train.jsonl, the project's 5 % validation
split by seed) with a plain PyTorch loop that mirrors `tunestack train`'s LoRA step: the project's chat
encoding (loss on assistant tokens), replay rows drawn as train/replay.py draws them, AdamW, warmup then
the named schedule, gradient clipping at 1.0, batches grouped by length. It then scores the tuned model with
the project's own evaluation: keyword accuracy on the 80 held-out rows (lm.evaluation), retention on
lm/general/retain.jsonl in both conditions (lm.retention) and KL(tuned || base) on the base's replies.
Levers beyond the config's: what is replayed (a category mix), which replay rows carry the system
prompt, paraphrase augmentation of the training questions, a KL-to-base term on replay rows, and early
stopping on retention (evaluated at `eval_at` steps; the latest step that meets the retention bars wins).

  python bench/demo_recipes.py --model PATH --recipes today,replay30 --seeds 0,1,2 --jobs 6 --out r.json
  python bench/demo_recipes.py --list

Writes one JSON: the environment, the base's scores, every run and mean ± sd per recipe with the bars.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "train" / "demo_data"

sys.path.insert(0, str(Path(__file__).parent))
from demo_paraphrase import dishes_in, paraphrased  # noqa: E402


@dataclass
class Recipe:
    replay: float = 0.15  # data.replay: fraction of the training rows added as the base's own answers
    mix: dict[str, float] | None = None  # replay rows per category (shares); None = uniform, as train/replay.py
    replay_system: str = "alternate"  # which replay rows carry the task's system prompt: alternate | all | none
    r: int = 16
    alpha: int = 32
    targets: str = "all-linear"  # all-linear | attn | mlp
    lr: float = 2e-3
    schedule: str = "cosine"  # any transformers.get_scheduler name
    warmup: float = 0.03
    epochs: float = 3.0
    max_steps: int = -1  # caps the steps (the bar: <= 246)
    batch_size: int = 8
    paraphrase: float = 0.0  # chance a task row's question is rewritten, drawn afresh each epoch
    kl_replay: float = 0.0  # weight of KL(tuned || base) on replay rows' answer tokens
    eval_at: list[int] = field(default_factory=list)  # extra checkpoints to score (early stopping on retention)


BASE = Recipe()
ARITH = {"arithmetic": 0.4, "instructions": 0.25, "facts": 0.15, "refusals": 0.1, "chat": 0.1}
RECIPES: dict[str, Recipe] = {
    "today": BASE,
    "replay30": replace(BASE, replay=0.3, max_steps=246),
    "replay50": replace(BASE, replay=0.5, max_steps=246),
    "replay30_arith": replace(BASE, replay=0.3, mix=ARITH, max_steps=246),
    "replay30_nosys": replace(BASE, replay=0.3, replay_system="none", max_steps=246),
    "kl1": replace(BASE, kl_replay=1.0),
    "replay30_kl1": replace(BASE, replay=0.3, kl_replay=1.0, max_steps=246),
    "attn_r16": replace(BASE, targets="attn"),
    "mlp_r16": replace(BASE, targets="mlp"),
    "r8": replace(BASE, r=8, alpha=16),
    "r32_lr1e3": replace(BASE, r=32, alpha=64, lr=1e-3),
    "lr1e3": replace(BASE, lr=1e-3),
    "linear": replace(BASE, schedule="linear"),
    "para50": replace(BASE, paraphrase=0.5),
    "para50_replay30_kl1": replace(BASE, paraphrase=0.5, replay=0.3, kl_replay=1.0, max_steps=246),
    "today_es": replace(BASE, eval_at=[123, 164, 205]),
    "kl3_replay30": replace(BASE, replay=0.3, kl_replay=3.0, max_steps=246),
    "replay30_arith_kl1": replace(BASE, replay=0.3, mix=ARITH, kl_replay=1.0, max_steps=246),
    "para50_replay30_arith_kl1": replace(BASE, paraphrase=0.5, replay=0.3, mix=ARITH, kl_replay=1.0, max_steps=246),
    "para50_replay50_kl1": replace(BASE, paraphrase=0.5, replay=0.5, kl_replay=1.0, max_steps=246),
    "para50_replay30_kl1_es": replace(BASE, paraphrase=0.5, replay=0.3, kl_replay=1.0, max_steps=246, eval_at=[164, 205]),
    # CI size: the suite trains training.epochs=2 today (164 steps) and needs >= 50 %.
    "ci_e2": replace(BASE, epochs=2),
    "ci_e1.5": replace(BASE, epochs=1.5),
    "ci_e1": replace(BASE, epochs=1),
    "ci_e1_lr3e3": replace(BASE, epochs=1, lr=3e-3),
    "ci_e1_noreplay": replace(BASE, epochs=1, replay=0.0),
    "ci_e1_para50": replace(BASE, epochs=1, paraphrase=0.5),
    "ci_e1_para50_lr3e3": replace(BASE, epochs=1, paraphrase=0.5, lr=3e-3),
    "ci_e1.5_para50": replace(BASE, epochs=1.5, paraphrase=0.5),
}

# ---- one process's state: model, tokenizer, data, the base's scores ----------------------------------------
S: dict = {}


def init(model_path: str, replay_rows: str | None, threads: int) -> None:
    import torch
    from lm.loading import device, load_model, load_tokenizer
    from lm.retention import retain_set
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere: as close to a CPU's numerics as a GPU gets
    torch.backends.cudnn.allow_tf32 = False
    S["dev"] = device()
    S["tok"] = load_tokenizer(model_path)
    S["path"] = model_path
    S["base"] = load_model(model_path).to(S["dev"]).eval()
    S["items"] = retain_set(None, 0)
    S["replay_rows"] = load_replay_rows(replay_rows)
    S["base_scores"] = evaluate(S["base"], None)


def load_replay_rows(path: str | None) -> list[dict]:
    """The base's replay answers: a train/replay.py cache file (the CPU's), or generated here greedily."""
    from train import replay
    from lm.data.config import DataConfig
    cats = {p["prompt"]: p.get("category", "open") for p in map(json.loads, replay.BUNDLED_PROMPTS.read_text().splitlines())}
    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    else:
        rows = replay.generate(S["base"], S["tok"], replay.prompt_pool(DataConfig(replay=0.15)), 48)
    return [{**r, "category": cats.get(r["prompt"], "open")} for r in rows if r["answer"].strip()]


def replay_examples(rec: Recipe, n_train: int, seed: int, system: str | None) -> list:
    from lm.data.formats import Example
    usable, want = S["replay_rows"], int(round(rec.replay * n_train))
    if rec.mix is None:
        chosen = random.Random(seed).sample(usable, min(want, len(usable)))  # exactly train/replay.py's draw
    else:
        rng, chosen = random.Random(seed), []
        for cat, share in rec.mix.items():
            pool = [r for r in usable if r["category"] == cat]
            chosen += rng.sample(pool, min(len(pool), int(round(share * want))))
        rng.shuffle(chosen)
    sys_turn = [{"role": "system", "content": system}] if system else []
    def with_system(i: int) -> bool:
        return {"all": True, "none": False}.get(rec.replay_system, i % 2 == 0)
    return [Example((sys_turn if with_system(i) else []) + [{"role": "user", "content": r["prompt"]},
                                                            {"role": "assistant", "content": r["answer"]}],
                    f"replay:{r['where']}") for i, r in enumerate(chosen)]


# ---- evaluation: the project's own ----------------------------------------------------------------------------
def evaluate(model, base_scores: dict | None) -> dict:
    from lm import retention
    from lm.data.config import DataConfig
    from lm.data.prepare import prepare
    from lm.evaluation import generate_answers
    from lm.metrics import keyword_match
    tok, items = S["tok"], S["items"]
    ev = prepare(DataConfig(train=str(DEMO / "chef_train.jsonl"), eval=str(DEMO / "chef_heldout.jsonl")), 0).eval
    preds = generate_answers(model, tok, ev, 16, 16)
    # lm.metrics.generation_scores' keyword_accuracy, without the BLEU/ROUGE it computes beside it (their packages)
    heldout = sum(keyword_match(p, ex.messages[-1]["content"]) for p, ex in zip(preds, ev)) / len(ev)
    system = retention.training_system_prompt(ev)
    conds = retention.conditions(system)
    replies = retention.ask_all(model, tok, items, conds, 24, 64)
    out = {"heldout": heldout, "replies": replies, "retention": {}}
    for c in conds:
        cats = sorted({it.category for it in items})
        by_cat = {cat: _acc([(it, r) for it, r in zip(items, replies[c]) if it.category == cat]) for cat in cats}
        out["retention"][c] = {"overall": _acc(list(zip(items, replies[c]))), "by_category": by_cat}
    if base_scores is not None:
        out["kl"] = retention.drift_kl(model, S["base"], tok, items, base_scores["replies"]["no_system"])
    return out


def _acc(pairs) -> float:
    from lm.retention import is_correct
    return sum(is_correct(r, it.answers) for it, r in pairs) / max(1, len(pairs))


def ratios(tuned: dict, base: dict) -> dict:
    """Tuned / base per condition: overall and the worst category (a category the base scores 0 on is skipped)."""
    out = {}
    for c, b in base["retention"].items():
        t = tuned["retention"][c]
        cats = {k: t["by_category"][k] / v for k, v in b["by_category"].items() if v > 0}
        worst = min(cats, key=cats.get) if cats else None  # a base that knows nothing has nothing to lose
        out[c] = {"overall": t["overall"] / b["overall"] if b["overall"] > 0 else 1.0, "worst_category": worst,
                  "worst_ratio": cats[worst] if cats else 1.0, "by_category": cats}
    return out


# ---- training --------------------------------------------------------------------------------------------------
def batches(lengths: list[int], bs: int, rng: random.Random) -> list[list[int]]:
    """Length-grouped batches as transformers' LengthGroupedSampler makes them: megabatches of 50 batches, each
    sorted longest first, the longest batch first of all."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = [sorted(idx[i:i + 50 * bs], key=lambda j: -lengths[j]) for i in range(0, len(idx), 50 * bs)]
    out = [m[i:i + bs] for m in mega for i in range(0, len(m), bs)]
    longest = max(range(len(out)), key=lambda k: lengths[out[k][0]])
    out[0], out[longest] = out[longest], out[0]
    return out


TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def train_run(name: str, rec: Recipe, seed: int) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import get_scheduler
    from lm.chat import IGNORE, encode_chat
    from lm.data.config import DataConfig
    from lm.data.prepare import prepare
    from lm.divergence import kl_div
    from lm.loading import load_model
    from lm.padding import Collator
    from lm.retention import training_system_prompt
    t0 = time.time()
    tok, dev = S["tok"], S["dev"]
    splits = prepare(DataConfig(train=str(DEMO / "chef_train.jsonl"), eval=str(DEMO / "chef_heldout.jsonl")), seed)
    task = splits.train
    reps = replay_examples(rec, len(task), seed, training_system_prompt(task)) if rec.replay > 0 else []
    dishes = sorted({d for ex in task for d in dishes_in(ex.messages[-2]["content"])}, key=len, reverse=True)
    n = len(task) + len(reps)
    per_epoch = math.ceil(n / rec.batch_size)
    total = rec.max_steps if rec.max_steps > 0 else math.ceil(per_epoch * rec.epochs)
    torch.manual_seed(seed)
    model = load_model(S["path"])
    targets = TARGETS.get(rec.targets, rec.targets)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=rec.r, lora_alpha=rec.alpha,
                                             lora_dropout=0.05, target_modules=targets, bias="none")).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rec.lr, weight_decay=0.0)
    sched = get_scheduler(rec.schedule, opt, num_warmup_steps=math.ceil(rec.warmup * total), num_training_steps=total)
    collate, rng = Collator(tok.pad_token_id), random.Random(seed)
    rep_feats = [dict(zip(("input_ids", "labels"), encode_chat(tok, ex.messages))) for ex in reps]
    step, tokens, checkpoints = 0, 0, []
    while step < total:
        rows = [paraphrased(ex, dishes, rng) if rng.random() < rec.paraphrase else ex for ex in task]
        feats = [dict(zip(("input_ids", "labels"), encode_chat(tok, ex.messages))) for ex in rows] + rep_feats
        is_replay = [False] * len(rows) + [True] * len(rep_feats)
        for b in batches([len(f["input_ids"]) for f in feats], rec.batch_size, rng):
            if step >= total:
                break
            model.train()
            batch = {k: v.to(dev) for k, v in collate([feats[i] for i in b]).items()}
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
            rmask = (labels != IGNORE) & torch.tensor([is_replay[i] for i in b], device=dev)[:, None]
            if rec.kl_replay > 0 and bool(rmask.any()):
                with torch.no_grad():
                    base_logits = S["base"](**batch).logits[:, :-1].float()
                loss = loss + rec.kl_replay * kl_div(logits[rmask], base_logits[rmask])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step in rec.eval_at or step == total:
                checkpoints.append(score(model, step, tokens))
    return {"recipe": name, "seed": seed, "steps": total, "train_rows": len(task), "replay_rows": len(reps),
            "train_tokens": tokens, "seconds": round(time.time() - t0, 1), "checkpoints": checkpoints}


def score(model, step: int, tokens: int) -> dict:
    ev = evaluate(model, S["base_scores"])
    ev.pop("replies")
    return {"step": step, "tokens": tokens, **ev, "ratios": ratios(ev, S["base_scores"])}


def task(name: str, rec: Recipe, seed: int) -> dict:
    try:
        return train_run(name, rec, seed)
    except Exception as e:  # one failed recipe must not lose the others' results
        return {"recipe": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}


def base_summary() -> dict:
    b = S["base_scores"]
    return {"heldout": b["heldout"], "retention": b["retention"]}


# ---- aggregation -----------------------------------------------------------------------------------------------
def chosen(run: dict, early_stop: bool) -> dict:
    """The final checkpoint; with early stopping, the latest one meeting the retention bars (else the best)."""
    cps = run["checkpoints"]
    if not early_stop or len(cps) == 1:
        return cps[-1]
    ok = [c for c in cps if meets_retention(c["ratios"])]
    return ok[-1] if ok else max(cps, key=lambda c: min(v["overall"] for v in c["ratios"].values()))


def meets_retention(r: dict) -> bool:
    return all(v["overall"] >= 0.95 and v["worst_ratio"] >= 0.80 for v in r.values())


def mean_sd(xs: list[float | None]) -> dict:
    xs = [x for x in xs if x is not None]  # KL is None where the base answered nothing
    if not xs:
        return {"mean": None, "sd": None, "values": []}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def summarize(name: str, runs: list[dict], early_stop: bool) -> dict:
    picks = [chosen(r, early_stop) for r in runs]
    held = [p["heldout"] for p in picks]
    out = {"recipe": name, "recipe_config": asdict(RECIPES[name]) if name in RECIPES else None, "seeds": len(runs),
           "early_stop": early_stop, "steps": [p["step"] for p in picks], "tokens": [p["tokens"] for p in picks],
           "heldout": mean_sd(held), "kl": mean_sd([p["kl"] for p in picks]), "conditions": {}}
    for c in picks[0]["ratios"]:
        out["conditions"][c] = {
            "overall_ratio": mean_sd([p["ratios"][c]["overall"] for p in picks]),
            "worst_ratio": mean_sd([p["ratios"][c]["worst_ratio"] for p in picks]),
            "worst_categories": [p["ratios"][c]["worst_category"] for p in picks],
            "by_category_ratio": {k: statistics.fmean(p["ratios"][c]["by_category"][k] for p in picks)
                                  for k in picks[0]["ratios"][c]["by_category"]} or {"-": 1.0}}
    mean_ret = {c: {"overall": out["conditions"][c]["overall_ratio"]["mean"],
                    "worst_ratio": min(out["conditions"][c]["by_category_ratio"].values())} for c in out["conditions"]}
    out["bars"] = {"heldout_mean_ge_90": statistics.fmean(held) >= 0.90, "every_seed_ge_85": min(held) >= 0.85,
                   "retention_mean_meets": meets_retention(mean_ret),
                   "retention_every_seed_meets": all(meets_retention(p["ratios"]) for p in picks),
                   "steps_le_246": max(out["steps"]) <= 246, "ci_mean_ge_65": statistics.fmean(held) >= 0.65}
    return out


def environment(commit: str | None = None) -> dict:
    import torch
    import transformers
    import peft
    if commit is None:  # a copy of the tree without .git (a GPU machine) passes --commit
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "commit": commit or None,
            "dtype": "float32, TF32 off", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct",
                    help="what model.name_or_path takes: embedded:<name> (converted once) or an HF model folder")
    ap.add_argument("--replay-rows", help="a train/replay.py cache rows.jsonl (the base's answers); default: generate")
    ap.add_argument("--recipes", default="today", help="comma-separated names, or 'all'")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="processes (each holds a model; several share one GPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which no new run starts; 0 = none")
    ap.add_argument("--out", type=Path, default=Path("demo_recipes.json"))
    ap.add_argument("--max-steps", type=int, default=0, help="cap every recipe's steps (a smoke test); 0 = as defined")
    ap.add_argument("--commit", help="the commit measured, where the tree has no .git; default: git rev-parse")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", type=Path, help="print a results JSON as the markdown table of docs/performance.md")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.list:
        for k, v in RECIPES.items():
            print(k, {f: x for f, x in asdict(v).items() if x != asdict(BASE)[f]})
        return
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    if args.max_steps:
        for n in names:
            RECIPES[n] = replace(RECIPES[n], max_steps=args.max_steps, eval_at=[s for s in RECIPES[n].eval_at if s < args.max_steps])
    seeds = [int(s) for s in args.seeds.split(",")]
    from train.base_model import resolve
    args.model = resolve(args.model).path  # converted here once, so the workers only load the folder
    t0, runs = time.time(), []
    init(args.model, args.replay_rows, args.threads)
    base = base_summary()
    print(f"base: held-out {base['heldout']:.3f}, retention " +
          ", ".join(f"{c} {v['overall']:.3f}" for c, v in base["retention"].items()), flush=True)
    ctx = get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=init,
                             initargs=(args.model, args.replay_rows, args.threads)) as pool:
        futs = [pool.submit(task, n, RECIPES[n], s) for n in names for s in seeds]
        for f in as_completed(futs):
            run = f.result()
            runs.append(run)
            cp = run.get("checkpoints", [{}])[-1]
            print(json.dumps({k: run.get(k) for k in ("recipe", "seed", "steps", "seconds", "error")} |
                             {"heldout": cp.get("heldout"), "kl": cp.get("kl"),
                              "ret": {c: round(v["overall"], 3) for c, v in cp.get("ratios", {}).items()},
                              "worst": {c: round(v["worst_ratio"], 3) for c, v in cp.get("ratios", {}).items()}}),
                  flush=True)
            write(args.out, base, runs, names, args.commit)
            if args.deadline and time.time() - t0 > args.deadline:
                print("deadline: no new runs start; waiting for those running", flush=True)
                for g in futs:
                    g.cancel()
                break
        runs += [g.result() for g in futs if not g.cancelled() and g.result() not in runs]
    write(args.out, base, runs, names, args.commit)


def table(body: dict) -> str:
    """recipe | steps | tokens | held-out mean ± sd (min) | retention overall / worst category per condition | KL."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f}"
    lines = ["| recipe | steps | tokens (k) | held-out % mean ± sd (min) | retention % of base, system prompt: overall / "
             "worst category | without: overall / worst category | KL | bars |", "|" + " --- |" * 8]
    for s in body["summary"]:
        h, c = s["heldout"], s["conditions"]
        def ret(name: str) -> str:
            v = c[name]
            cats = v["by_category_ratio"]
            worst = min(cats, key=cats.get)
            return f"{pct(v['overall_ratio']['mean'])} / {pct(cats[worst])} ({worst})"
        b = s["bars"]
        full = all(b[k] for k in ("heldout_mean_ge_90", "every_seed_ge_85", "retention_every_seed_meets", "steps_le_246"))
        verdict = "all" if full else ("CI >= 65 %" if b["ci_mean_ge_65"] else "-")
        steps = f"{statistics.fmean(s['steps']):.0f}" + (" (early stop)" if s["early_stop"] else "")
        kl = "-" if s["kl"]["mean"] is None else f"{s['kl']['mean']:.3f}"
        lines.append(f"| {s['recipe']} | {steps} | {statistics.fmean(s['tokens']) / 1000:.0f} | {pct(h['mean'])} ± "
                     f"{pct(h['sd'])} ({pct(min(h['values']))}) | {ret('train_system')} | {ret('no_system')} | {kl} | "
                     f"{verdict} |")
    return "\n".join(lines)


def write(out: Path, base: dict, runs: list[dict], names: list[str], commit: str | None) -> None:
    summary = []
    for n in names:
        done = [r for r in runs if r["recipe"] == n and "checkpoints" in r]
        if done:
            summary.append(summarize(n, sorted(done, key=lambda r: r["seed"]), False))
            if len(done[0]["checkpoints"]) > 1:
                summary.append(summarize(n, sorted(done, key=lambda r: r["seed"]), True))
    body = {"environment": environment(commit), "base": base, "summary": summary, "runs": runs}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
