"""The one command: `tunestack` lists every subcommand, each has its --help with defaults, the stage aliases
(`python -m train|export|serve`) parse exactly the same arguments, bad input is one line and exit 2,
and no flag has two meanings (`--force` is gone: `--overwrite` and `--override-gate REASON`)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, refused
from tunestack import demo
from tunestack.cli import build_parser, main

TUNESTACK = Path(sys.executable).parent / "tunestack"  # the console script pyproject declares
SUBCOMMANDS = ("train", "export", "serve", "registry", "demo")
LEAVES = [["train"], ["train", "run"], ["train", "eval"], ["train", "worker"], ["export"],
          *[["export", c] for c in ("merge", "onnx", "quantize", "tensorrt", "all")], ["serve"], ["registry"],
          *[["registry", c] for c in ("list", "publish", "rollback", "prune")], ["demo"]]


def _cli(*args: str, module: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module] if module else [str(TUNESTACK)]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in ap._actions if isinstance(a, argparse._SubParsersAction)), {})


def _all_parsers(ap: argparse.ArgumentParser):
    yield ap
    for child in _subparsers(ap).values():
        yield from _all_parsers(child)


def test_the_console_script_lists_every_subcommand():
    p = _cli("--help")
    assert p.returncode == 0, p.stderr
    listed = re.findall(r"^    (\w+) ", p.stdout, re.M)
    assert listed == list(SUBCOMMANDS), p.stdout
    assert set(_subparsers(build_parser())) == set(SUBCOMMANDS)


@pytest.mark.parametrize("argv", LEAVES, ids=" ".join)
def test_every_subcommand_has_its_help(argv, capsys):
    out = _help(capsys, argv)
    assert out.startswith(f"usage: tunestack {' '.join(argv)}"), out[:200]


@pytest.mark.parametrize("argv,shows", [
    (["export", "all"], ["--overwrite", "--override-gate REASON", "(default: 0.05)", "(default: 5)"]),
    (["train", "worker"], ["(default: 1.0)"]),
    (["train"], ["training.lr = ", "publish.override_gate = None"]),  # every config field with its default
    (["serve"], ["(default: 8000; env SERVE_PORT)", "(default: registry; env SERVE_REGISTRY)"]),
    (["registry", "prune"], ["(default: 5)", "(default: registry)"]),
    (["demo"], ["smollm2_lora_chef", "(default: registry)"]),
])
def test_help_shows_the_documented_defaults(argv, shows, capsys):
    out = " ".join(_help(capsys, argv).split())
    for s in shows:
        assert " ".join(s.split()) in out, (s, out[-1500:])


@pytest.mark.parametrize("stage,argv", [("train", []), ("train", ["eval"]), ("train", ["worker"]),
                                        ("export", []), ("export", ["all"]), ("export", ["tensorrt"]), ("serve", [])])
def test_the_stage_alias_parses_exactly_the_same_arguments(stage, argv):
    alias = _cli(*argv, "--help", module=stage)
    one = _cli(stage, *argv, "--help")
    assert alias.returncode == one.returncode == 0, alias.stderr + one.stderr
    # the same help but for the program's name (the same length: usage lines wrap alike)
    assert alias.stdout.replace(f"usage: python -m {stage}", f"usage: tunestack {stage}") == one.stdout


@pytest.mark.parametrize("argv,needles", [
    (["bogus"], ["invalid choice: 'bogus'"]),
    (["export", "all", "run", "--force"], ["unrecognized arguments: --force"]),
    (["export", "all", "run", "--force-publish"], ["unrecognized arguments: --force-publish"]),
    (["export", "publish", "x"], ["invalid choice: 'publish'"]),
    (["train", "publish", "x"], ["config file not found"]),  # train publish is gone: `publish` is no config
    (["serve", "list"], ["unrecognized arguments: list"]),
    (["serve", "--port", "x"], ["SERVE_PORT", "'x'"]),
    (["export", "tensorrt", "x", "--max-batch", "many"], ["--max-batch", "invalid int value: 'many'"]),
    (["registry", "prune", "--keep", "two"], ["--keep", "invalid int value: 'two'"]),
    (["registry"], ["required"]),
    ([], ["required"]),
])
def test_bad_input_is_one_line_and_exit_2(argv, needles):
    p = _cli(*argv)
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, (p.returncode, err)
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("argv,needles", [
    (["train", "missing.yaml"], ["missing.yaml: config file not found"]),
    (["train", "smollm2_lora_chef", "training.no_such_key=1"], ["training.no_such_key", "unknown"]),
    (["train", "smollm2_lora_chef", "training.lr=fast"], ["training.lr", "expected float", "'fast'"]),
    (["train", "run", "smollm2_lora_chef", "publish.min_gain=[1]"], ["publish.min_gain", "expected float"]),
])
def test_train_config_errors_name_the_file_or_key(argv, needles, capsys):
    refused(main, capsys, argv, *needles)


def test_no_flag_is_spelled_force_anywhere():
    options = {o for ap in _all_parsers(build_parser()) for a in ap._actions for o in a.option_strings}
    assert {"--overwrite", "--override-gate", "--registry"} <= options
    assert not [o for o in options if "force" in o], options
    sources = [p for d in ("train", "export", "serve", "tunestack", "artifacts", "lm") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 50
    mentions = [f"{p.relative_to(ROOT)}" for p in sources if re.search(r"--force\b|force=True|publish\.force",
                                                                        p.read_text(encoding="utf-8"))]
    assert mentions == []


def test_the_registry_flag_is_one_spelling_everywhere():
    for ap in _all_parsers(build_parser()):
        for a in ap._actions:
            if a.dest == "registry":
                assert a.option_strings == ["--registry"], (ap.prog, a.option_strings)


def test_demo_is_make_demo():
    """`tunestack demo` runs the two commands `make demo` used to spell out, and `make demo` runs it."""
    args = build_parser().parse_args(["demo"])
    cmds = demo.commands(args)
    assert cmds == [["train", "smollm2_lora_chef", "output.overwrite=true", "output.registry=registry"],
                    ["export", "all", "runs/chef-lora", "--registry", "registry", "--name", "chef", "--overwrite"]]
    for argv in cmds:  # each parses as the real command (the train one after its default `run`)
        build_parser().parse_args(["train", "run", *argv[1:]] if argv[0] == "train" else argv)
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe and recipe.group(1).split() == [".venv/bin/tunestack", "demo"], recipe


def test_the_docs_spell_the_one_command():
    """README and docs say `tunestack ...`; `python -m train|export|serve` appears only where named as the alias."""
    docs = [ROOT / "README.md", ROOT / "artifacts/README.md", ROOT / "k8s/README.md", *(ROOT / "docs").glob("*.md")]
    stale = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in docs for m in
             re.finditer(r"(?<!alias `)python3? -m (train|export|serve)\b(?!\|)[^\n]{0,40}", p.read_text(encoding="utf-8"))]
    assert stale == []
    assert "tunestack registry publish" in (ROOT / "docs/train.md").read_text(encoding="utf-8")
