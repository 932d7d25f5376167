"""The local fine-tuning runner: `python -m train worker` beside the server, when the training stack is installed.

The API only records and enqueues jobs (api.py). On one box with everything installed the
server also starts the worker, as a child process in its own session: training never runs in a
serving process, a crash in it never takes the server down, and the worker is restarted (with a
growing pause) if it dies. With SERVE_FINETUNE_WORKER=off, or in the serving image, which has no
training stack, jobs wait for an external worker: compose's `trainer` service or a Kubernetes Job.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("serve.finetune.local_trainer")
NEEDS = ("train", "accelerate", "peft")  # what `python -m train worker` needs importable (looked up, never imported)


def training_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in NEEDS)


class LocalTrainer:
    def __init__(self, registry: Path, extra: list[str] = (), store: str = ""):
        self.cmd = [sys.executable, "-m", "train", "worker", "--registry", str(registry), "--exit-with-parent",
                    *(["--store", store] if store else []),
                    *[a for s in extra for a in ("--set", s)]]
        self.proc: subprocess.Popen | None = None
        self.owner = os.getpid()  # gunicorn forks its workers from this process: only the owner may stop the worker
        self.stopping = threading.Event()
        self.spawning = threading.Lock()  # a stop() right after start() must not miss a worker being spawned
        self.thread = threading.Thread(target=self._supervise, name="local-trainer", daemon=True)

    def start(self) -> "LocalTrainer":
        self.thread.start()
        return self

    def _supervise(self) -> None:
        pause = 1.0
        while True:
            with self.spawning:
                if self.stopping.is_set():
                    return
                self.proc = subprocess.Popen(self.cmd, start_new_session=True)
            log.info("fine-tuning worker started (pid %d): %s", self.proc.pid, " ".join(self.cmd[1:]))
            rc = self.proc.wait()
            if self.stopping.is_set():
                return
            log.error("fine-tuning worker exited with %s; restarting in %.0f s (queued and running jobs are kept)",
                      rc, pause)
            if self.stopping.wait(pause):
                return
            pause = min(pause * 2, 60.0)

    def stop(self) -> None:
        """Stop the worker (SIGTERM to its group, SIGKILL after 20 s); a no-op in a forked copy of the owner.

        A gunicorn worker is forked from the process that started this supervisor and unwinds the same
        `finally` on exit: it must not kill the worker (nor wait on it: the copied Popen's wait lock may
        be held by the supervisor thread, which the fork did not copy)."""
        if os.getpid() != self.owner:
            return
        with self.spawning:
            self.stopping.set()  # no worker is spawned after this
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the worker and its training run; a running job resumes later
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start_local_trainer(setting: str, registry: Path, extra: list[str] = (), store: str = "") -> LocalTrainer | None:
    """auto: start it when the training stack is installed; on: start it or fail; off: never."""
    if setting in ("off", "k8s"):
        return None
    if not training_installed():
        if setting == "on":
            raise ValueError("SERVE_FINETUNE_WORKER=on: the training stack is not installed (pip install 'tunestack[train]')")
        log.info("fine-tuning jobs queue for an external worker (python -m train worker --registry %s)", registry)
        return None
    return LocalTrainer(registry, extra, store).start()
