"""The vLLM server as a child process: started in its own session, watched, stopped with its workers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import httpx

log = logging.getLogger("serve.vllm")


class VLLMChild:
    """The vLLM server process, in its own session so that stopping it stops its workers too.

    Only the process that started it (gunicorn's master) stops it or judges how it ended: the forked
    worker cannot wait on it, and a worker exiting must never take vLLM down."""

    def __init__(self, cmd: list[str], cpu: bool):
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        log.info("starting vLLM: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self.owner = os.getpid()
        self.stopped = False  # set when we stop it: an exit before that is a crash

    def alive(self) -> bool:
        """Works in gunicorn's forked worker too, where Popen.poll() cannot wait on the master's child."""
        try:
            os.kill(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie (exited, not yet reaped by the master) counts as dead
            with open(f"/proc/{self.proc.pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return True

    def wait_healthy(self, url: str) -> bool:
        """Poll vLLM's /health until it answers 200 (True) or the process exits (False)."""
        http = httpx.Client(timeout=2)
        while self.alive():
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    @property
    def crashed(self) -> bool:
        """vLLM exited without being asked to (owner only)."""
        return os.getpid() == self.owner and self.proc.poll() is not None and not self.stopped

    def kill(self) -> None:
        """SIGKILL it and its workers, from any process (the worker's monitor, for a wedged vLLM): the
        owner then sees an exit it did not ask for, a crash."""
        _signal_group(self.proc.pid, signal.SIGKILL)

    def stop(self, *_) -> None:
        if os.getpid() != self.owner:
            return
        if self.proc.poll() is None:
            self.stopped = True
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # what a killed server leaves behind: its engine core
        self.proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # already gone
        pass
