"""Where the suite's wall time goes, printed at the end of a run (the last lines CI keeps).

For each xdist worker: when it ran which test files, and the gaps where it ran nothing; for the
background demo job: when each step (train, export) ended. The chain demo -> evaluation -> export ->
its users sets the suite's length; this shows whether the workers waited on it."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pytest

LONGEST = 12  # test files listed, longest first


class Timeline:
    def __init__(self, background: Callable[[], Path]):
        self.t0 = time.time()
        self.background = background  # the demo job's folder (known once the session's temp folder is)
        self.spans: dict[tuple[str, str], list[float]] = {}

    def pytest_runtest_logreport(self, report) -> None:
        node = getattr(report, "node", None)  # the xdist worker that ran it (absent without xdist)
        worker = node.gateway.id if node is not None else "main"
        key = (worker, report.nodeid.split("::")[0])
        span = self.spans.setdefault(key, [report.start, report.stop])
        span[0], span[1] = min(span[0], report.start), max(span[1], report.stop)

    @pytest.hookimpl(trylast=True)  # after the durations: the last lines of the log, which CI keeps
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.spans:
            return
        w = terminalreporter.write_line
        w(f"timeline (minutes from the session's start; {time.time() - self.t0:.0f} s in all):")
        for step in ("train", "export"):
            rc = self.background() / f"{step}.rc"
            if rc.is_file():
                w(f"  background demo: {step} ended at {(rc.stat().st_mtime - self.t0) / 60:.1f}")
        by_worker: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for (worker, path), (a, b) in self.spans.items():
            by_worker[worker].append((a - self.t0, b - self.t0, path))
        for worker, spans in sorted(by_worker.items()):
            spans.sort()
            idle = sum(max(0.0, b0 - a1) for (_, a1, _), (b0, _, _) in zip(spans, spans[1:]))
            w(f"  {worker}: {len(spans)} files, {spans[0][0] / 60:.1f}-{spans[-1][1] / 60:.1f}, "
              f"idle between files {idle:.0f} s")
        longest = sorted(((b - a, a, worker, path) for worker, s in by_worker.items() for a, b, path in s), reverse=True)
        for d, a, worker, path in longest[:LONGEST]:
            w(f"  {d / 60:5.1f} min  from {a / 60:5.1f}  {worker}  {path}")
