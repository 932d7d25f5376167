"""tunestack train (alias: python -m train): fine-tune and evaluate.

  tunestack train [run] [CONFIG] [section.field=value ...] [--resume]
  tunestack train eval  (--run RUN | --model MODEL) --data FILE [--out FILE]
  tunestack train worker --registry DIR [--once] [--poll S] [--set section.field=value ...]   runs queued API jobs

Publishing a finished run is `tunestack registry publish RUN`.
Bad input exits 2 with one line naming file:line:field.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from lm.errors import UserError

# TRL checks the installed vLLM against its tested range on import; training never drives vLLM.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
# peft imports bitsandbytes, which on a CPU with AVX512-BF16 logs a warning that an optional kernel hub
# package is missing; it would break the CLI's one-line error contract, and qlora runs without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

COMMANDS = ("run", "eval", "worker")
EXTRA = "train"  # the optional dependencies (pyproject) every train command needs


def build_parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    from lm.cli import stage_parser

    return stage_parser(prog, configure)


def configure(ap: argparse.ArgumentParser) -> None:
    """The train command's arguments, on `python -m train`'s parser or on `tunestack train`."""
    from lm.cli import HelpFormatter
    from train.config import help_text

    ap.description, ap.epilog, ap.formatter_class = __doc__, help_text(), HelpFormatter
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{run,eval,worker}")
    r = sub.add_parser("run", help="fine-tune (the default command: `train CONFIG` means `train run CONFIG`)",
                       epilog=help_text(), formatter_class=HelpFormatter)
    r.add_argument("args", nargs="*", help="an optional CONFIG (a YAML file or a bundled config's name), "
                   "then section.field=value overrides")
    r.add_argument("--resume", action="store_true", help="continue output.dir from its last checkpoint")
    e = sub.add_parser("eval", help="score a run or a base model on a dataset", formatter_class=HelpFormatter)
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", type=Path, help="a finished run directory")
    g.add_argument("--model", help="a base model: folder, hub id or embedded:<name>")
    e.add_argument("--data", required=True, help="dataset file (any supported format)")
    e.add_argument("--format", default="auto", help="the dataset's format; auto detects it from the rows")
    e.add_argument("--labels", default="", help="comma-separated classification labels (empty: from the data)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="generation length per answer")
    e.add_argument("--batch-size", type=int, default=16, help="rows generated together")
    e.add_argument("--max-examples", type=int, default=0, help="score only the first N rows; 0 = all")
    e.add_argument("--out", type=Path, help="write the JSON report here too")
    w = sub.add_parser("worker", help="run the fine-tuning jobs the serving API queued in a registry",
                       formatter_class=HelpFormatter)
    w.add_argument("--registry", required=True, type=Path, help="the registry the serving API queues jobs in")
    w.add_argument("--once", action="store_true", help="run the queued jobs, then exit (unset: wait for more)")
    w.add_argument("--store", type=Path, help="where the API keeps files and jobs (unset: REGISTRY/.finetune)")
    w.add_argument("--job", help="run this job only (what a Kubernetes Job's pod does), then exit")
    w.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    w.add_argument("--exit-with-parent", action="store_true", help="exit when the process that started it is gone")
    w.add_argument("--set", dest="extra", action="append", default=[], metavar="section.field=value",
                   help="an override applied to every job (repeatable), e.g. eval.retain_max_examples=40")


def with_default_command(argv: list[str]) -> list[str]:
    """`train CONFIG ...` (or no arguments) means `train run CONFIG ...`."""
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        return ["run", *argv]
    return argv


def cmd_worker(args) -> int:
    from train.worker import Worker

    w = Worker(args.registry, args.extra, store=args.store)
    w.stop_on_sigterm()
    if args.job:
        job = w.one(args.job)
        print(f"{job.id}: {job.status}")
        return 0 if job.status in ("succeeded", "cancelled") else 1
    if args.once:
        w.recover()
        while w.once() is not None:
            pass
        return 0
    import os

    w.forever(args.poll, os.getppid() if args.exit_with_parent else None)
    return 0


def cmd_run(args) -> int:
    from train.config import load_config
    from train.recipe import run

    cfg_path = None
    overrides = list(args.args)
    if overrides and "=" not in overrides[0]:
        cfg_path = overrides.pop(0)
    cfg = load_config(cfg_path, overrides)
    rd = run(cfg, resume=args.resume)
    print(f"run: {rd.root}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from lm import evaluation
    from train.base_model import resolve
    from lm.data.config import DataConfig
    from lm.data.prepare import prepare
    from lm.features import tokenize
    from lm.loading import device, load_model, load_tokenizer, load_tuned

    dc = DataConfig(train=args.data, format=args.format, eval=None, validation_fraction=0.0,
                    labels=[s for s in args.labels.split(",") if s])
    splits = prepare(dc, seed=0)
    examples = splits.train[: args.max_examples or None]
    if args.run:
        model, tok = load_tuned(args.run)
    else:
        ref = resolve(args.model)
        tok = load_tokenizer(ref.path)
        model = load_model(ref.path, torch.float32).to(device())
    feats, _ = tokenize(tok, examples, 4096)
    res, preds = evaluation.score(model, tok, feats, examples, splits.labels, args.max_new_tokens, args.batch_size)
    res = {"model": str(args.run or args.model), "data": args.data, **res}
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(with_default_command(list(sys.argv[1:] if argv is None else argv)))
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed train command; bad input (and a missing train extra) exits 2 with one line."""
    from lm.cli import require_extras

    require_extras("train", EXTRA)
    try:
        return {"run": cmd_run, "eval": cmd_eval, "worker": cmd_worker}[args.cmd](args)
    except UserError as e:
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2


def _end_progress_bars() -> None:
    """A progress bar cut short by the error leaves the cursor mid-line: close it, so the error starts its own line."""
    tqdm = sys.modules.get("tqdm")  # imported only once training started
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
