"""The local fine-tuning worker's supervisor, with a stand-in worker command (a sleeping Python)."""

from __future__ import annotations

import os
import sys
import time

import psutil

from serve.finetune.local_trainer import LocalTrainer

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _supervised(tmp_path) -> LocalTrainer:
    t = LocalTrainer(tmp_path)
    t.cmd = SLEEPER
    t.start()
    deadline = time.time() + 30
    while t.proc is None:
        assert time.time() < deadline
        time.sleep(0.05)
    return t


def test_stop_ends_the_worker_and_the_supervisor_does_not_restart_it(tmp_path):
    t = _supervised(tmp_path)
    pid = t.proc.pid
    t.stop()
    t.thread.join(timeout=10)
    assert not t.thread.is_alive()
    assert t.proc.pid == pid and t.proc.returncode is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_forked_copy_of_the_owner_leaves_the_worker_alone(tmp_path):
    """gunicorn forks its worker from the process that started the supervisor; on exit the fork unwinds
    `python -m serve`'s finally and calls stop(): that once SIGTERMed the fine-tuning worker (and the
    supervisor restarted it), and hung 20 s on the copied Popen's wait lock."""
    t = _supervised(tmp_path)
    pid = t.proc.pid
    child = os.fork()
    if child == 0:  # the forked copy: stop() must touch nothing
        t.stop()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    try:
        assert t.proc.poll() is None and t.proc.pid == pid, "the fork's stop() killed the owner's worker"
        assert not t.stopping.is_set()
    finally:
        t.stop()


def test_a_stop_right_after_the_start_leaves_no_worker_behind(tmp_path):
    """The supervisor spawns the worker on its own thread: a stop() that lands before (or while) it spawns must
    still end with no worker process (one was seen outliving an in-process `serve` that refused its settings)."""
    for _ in range(10):
        t = LocalTrainer(tmp_path)
        t.cmd = SLEEPER  # the race is in the spawning, whatever the worker
        t.start()
        t.stop()
        t.thread.join(5)
        assert not t.thread.is_alive()
        assert t.proc is None or t.proc.wait(timeout=25) is not None
