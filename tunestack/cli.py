"""tunestack: fine-tune, export, serve and publish LLMs; one command over the three stages and the registry.

  tunestack train CONFIG [section.field=value ...] [--resume]     fine-tune (also: train eval, train worker)
  tunestack export merge|onnx|quantize|tensorrt|all ...           deployable weights from a run
  tunestack serve [--registry DIR] [--backend flask|vllm] ...     the OpenAI-compatible server
  tunestack registry list|publish|rollback|prune ...              the versions serving reads
  tunestack demo                                                  what `make demo` runs

`python -m train|export|serve` are aliases: each stage builds the parser mounted here.
Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from lm.cli import HelpFormatter, OneLineParser, require_extras

PROG = "tunestack"


def _stages() -> dict[str, ModuleType]:
    """Each stage's command module: configure(parser), run_command(args), EXTRA."""
    import export.__main__ as export_cli
    import serve.__main__ as serve_cli
    import train.__main__ as train_cli

    return {"train": train_cli, "export": export_cli, "serve": serve_cli}


def build_parser() -> argparse.ArgumentParser:
    from tunestack import demo, registry_command

    ap = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{train,export,serve,registry,demo}")
    helps = {"train": "fine-tune and evaluate (alias: python -m train)",
             "export": "merge, ONNX, int8, TensorRT from a run (alias: python -m export)",
             "serve": "serve a registry behind the OpenAI API (alias: python -m serve)"}
    for name, module in _stages().items():
        module.configure(sub.add_parser(name, help=helps[name], prog=f"{PROG} {name}"))
    registry_command.configure(sub.add_parser("registry", help="list, publish, roll back and prune versions",
                                              prog=f"{PROG} registry"))
    demo.configure(sub.add_parser("demo", help="what `make demo` runs: train the chef LoRA, export, publish",
                                  prog=f"{PROG} demo"))
    return ap


def _normalize(argv: list[str]) -> list[str]:
    """`tunestack train CONFIG ...` means `tunestack train run CONFIG ...`, as `python -m train CONFIG` does."""
    if argv[:1] == ["train"]:
        from train.__main__ import with_default_command

        return ["train", *with_default_command(argv[1:])]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = _normalize(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if args.command == "registry":
        from tunestack.registry_command import run_command

        return run_command(args)
    if args.command == "demo":
        return _demo(args)
    return _stages()[args.command].run_command(args)


def _demo(args: argparse.Namespace) -> int:
    from tunestack.demo import commands

    require_extras("demo", "train", "export")
    for argv in commands(args):
        print(f"$ {PROG} {' '.join(argv)}", flush=True)
        code = main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
