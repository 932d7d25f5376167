"""Expensive artifacts made once per test run, in the background from the end of collection on.

The demo run (the real SmolLM2 fine-tuned on the menu) and its export take a quarter of the suite on
2 cores. Made lazily by the first test that needs them, every worker waits behind them; started as a
detached job when collection finds a user, they overlap with everything else, and under pytest-xdist
every worker waits on the same job (started once: `mkdir` of its folder is the lock).

A job is a list of steps (argv lists) run one after another by this module's __main__ in a new
session; each step writes `<step>.log` and then `<step>.rc`, so a waiter in any process reads the
outcome from files. The process that owns the run (the xdist controller, or pytest itself without
xdist) kills a job still running when the session ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

NOT_RUN = "not run: an earlier step failed"


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]


class BackgroundJob:
    def __init__(self, shared: Path, name: str):
        self.dir = shared / f"background-{name}"

    def start(self, steps: list[Step], cwd: Path, env: dict[str, str]) -> bool:
        """Start the job unless a process of this run already has; True if this call started it."""
        try:
            self.dir.mkdir(parents=True)
        except FileExistsError:
            return False
        plan = {"cwd": str(cwd), "steps": [{"name": s.name, "argv": list(s.argv)} for s in steps]}
        (self.dir / "plan.tmp").write_text(json.dumps(plan))
        os.replace(self.dir / "plan.tmp", self.dir / "plan.json")  # readers see all of it or nothing
        log = open(self.dir / "runner.log", "w")
        p = subprocess.Popen([sys.executable, __file__, str(self.dir)], cwd=cwd, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        (self.dir / "pid").write_text(str(p.pid))
        return True

    @property
    def started(self) -> bool:
        return (self.dir / "plan.json").is_file()

    def steps(self) -> list[str]:
        """The names of the job's steps; [] if it was never started."""
        if not self.started:
            return []
        return [s["name"] for s in json.loads((self.dir / "plan.json").read_text())["steps"]]

    def wait(self, step: str, timeout: float) -> str:
        """Block until `step` has finished; its log on success, a test failure (with the log's tail) otherwise."""
        rc_file, deadline = self.dir / f"{step}.rc", time.monotonic() + timeout
        while not rc_file.is_file():
            if time.monotonic() > deadline:
                pytest.fail(f"background step {step} did not finish in {timeout:.0f} s ({self.dir})")
            time.sleep(2)
        rc = rc_file.read_text().strip()
        log = (self.dir / f"{step}.log").read_text(errors="replace") if (self.dir / f"{step}.log").is_file() else ""
        if rc != "0":
            pytest.fail(f"background step {step}: {rc}\n{log[-3000:]}")
        return log

    def stop(self) -> None:
        """Kill the job's process group if it is still running (the session ended before it did)."""
        pid_file = self.dir / "pid"
        if not pid_file.is_file():
            return
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def _run(folder: Path) -> int:
    plan = json.loads((folder / "plan.json").read_text())
    failed = False
    for step in plan["steps"]:
        rc_file = folder / f"{step['name']}.rc"
        if failed:
            rc_file.write_text(NOT_RUN)
            continue
        with open(folder / f"{step['name']}.log", "w") as log:
            rc = subprocess.run(step["argv"], cwd=plan["cwd"], stdout=log, stderr=subprocess.STDOUT).returncode
        tmp = rc_file.with_suffix(".tmp")
        tmp.write_text(str(rc))
        os.replace(tmp, rc_file)  # a waiter never reads a half-written rc
        failed = rc != 0
    return 0


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
