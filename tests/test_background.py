"""The suite's background jobs (tests/background.py): started once, waited on from files, stopped at the end."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.background import NOT_RUN, BackgroundJob, Step

PY = sys.executable


def test_steps_run_in_order_once_and_waiters_read_their_logs(tmp_path):
    job = BackgroundJob(tmp_path, "j")
    steps = [Step("a", (PY, "-c", "print('first')")), Step("b", (PY, "-c", "import sys; print('second'); sys.exit(3)")),
             Step("c", (PY, "-c", "print('never')"))]
    assert job.start(steps, tmp_path, dict(os.environ))
    assert not BackgroundJob(tmp_path, "j").start(steps, tmp_path, dict(os.environ))  # another worker: not again
    assert job.steps() == ["a", "b", "c"]
    assert "first" in job.wait("a", 60)
    with pytest.raises(pytest.fail.Exception, match="(?s)background step b: 3.*second"):
        job.wait("b", 60)
    with pytest.raises(pytest.fail.Exception, match=NOT_RUN):
        job.wait("c", 60)


def test_a_job_past_its_wait_fails_and_stop_kills_it(tmp_path):
    job = BackgroundJob(tmp_path, "slow")
    marker = tmp_path / "finished"
    assert job.start([Step("sleep", (PY, "-c", f"import time, pathlib; time.sleep(30); pathlib.Path({str(marker)!r}).touch()"))],
                     tmp_path, dict(os.environ))
    with pytest.raises(pytest.fail.Exception, match="did not finish in 1 s"):
        job.wait("sleep", 1)
    pid = int((job.dir / "pid").read_text())
    assert _live_in_group(pid)  # the runner and its step
    job.stop()
    deadline = time.monotonic() + 10
    while _live_in_group(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_in_group(pid) and not marker.exists()


def _live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are not zombies (/proc/PID/stat: state is field 3, pgrp field 5)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_a_job_never_started_has_no_steps(tmp_path):
    assert BackgroundJob(tmp_path, "none").steps() == [] and not BackgroundJob(tmp_path, "none").started
