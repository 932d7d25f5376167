"""What every command line shares: errors in one line (exit 2), help with defaults, the optional-extra check.

Each stage builds its parser from these (`python -m train|export|serve`), and `tunestack` mounts the same
parsers as its subcommands, so both spellings parse exactly the same arguments.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import re
import sys
from typing import Callable, NoReturn

DISTRIBUTION = "tunestack"


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that bad input is one stderr line (usage stays in --help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}\n")


def stage_parser(prog: str, configure: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """A stage's own parser (`python -m STAGE`): the arguments `configure` adds, as `tunestack STAGE` mounts them."""
    ap = OneLineParser(prog=prog)
    configure(ap)
    return ap


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks; every option with a default shows it (an unset one says in its help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(dist: str) -> bool:
    """A distribution counts as present when installed, or when its module is (onnxruntime-gpu for onnxruntime)."""
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return importlib.util.find_spec(_norm(dist).replace("-", "_")) is not None


def missing_extra(extra: str) -> list[str]:
    """The distributions of tunestack's `extra` that are not installed; [] when tunestack runs uninstalled."""
    from packaging.requirements import Requirement

    try:
        requires = md.requires(DISTRIBUTION) or []
    except md.PackageNotFoundError:
        return []  # a bare checkout on PYTHONPATH: no metadata to check against
    missing = []
    for line in requires:
        req = Requirement(line)
        in_extra = req.marker is not None and req.marker.evaluate({"extra": extra}) \
            and not req.marker.evaluate({"extra": ""})
        if in_extra and _norm(req.name) != DISTRIBUTION and not _installed(req.name):
            missing.append(req.name)
    return missing


def require_extras(command: str, *extras: str) -> None:
    """Exit 2 with one line naming the extra to install when `command`'s stage lacks one (never a traceback)."""
    for extra in extras:
        missing = missing_extra(extra)
        if missing:
            print(f"error: tunestack {command} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                  f"pip install 'tunestack[{extra}]'", file=sys.stderr)
            raise SystemExit(2)
