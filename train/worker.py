"""python -m train worker: run the fine-tuning jobs that the serving API queued.

    python -m train worker --registry DIR [--once] [--poll 1] [--set section.field=value ...]

The API (serve/finetune/api.py) only records jobs in the registry volume (artifacts/finetune.py).
This worker claims the oldest queued job and trains it as a `python -m train` subprocess (its own
process group), so a crash in training never takes the worker or the server down. While it runs,
the worker turns the run's metrics log into job events and its checkpoints into the job's checkpoint
list, and it stops the process group if a cancel is asked for (then nothing is published: the
recipe publishes only after training, evaluation and the gate). The run publishes the adapter into
the registry under the job's name (`ft-<id>`), where every replica picks it up within seconds.

The job's spec is typed (artifacts.finetune.JobSpec) and repeats no training default: the worker
builds the train config (train/config.py) from the method's documented defaults, sets what the job
asked for (the learning-rate multiplier scales the config's own training.lr), and the run gets that
config as a file (runs/<job>.yaml beside its log).

A worker that starts finds any job left `running` by a worker that died, and queues it again to
resume from its last checkpoint. `--set` applies operator overrides to every job (e.g. eval sizes).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from artifacts import Registry, RunDir
from artifacts.atomic import atomic_write_text
from artifacts.finetune import FileStore, Job, JobStore, checkpoint_names, loss_at, store_dir
from artifacts.registry import RegistryError
from lm.errors import ConfigError
from train.config import Config, load_config, validate
from train.methods import check_config

CHECK_SECONDS = 1.0  # how often a running job's log, checkpoints and cancel flag are read
TERMINATED = 128 + signal.SIGTERM  # exit status of a worker stopped mid-job: not a success, so a Kubernetes Job retries


@dataclass
class Progress:
    """What the worker has already turned into events for the running job. The checkpoint list holds the
    checkpoints on disk (training.save_total_limit prunes older ones; a pruned one cannot be served)."""

    steps_seen: int = 0
    checkpoints: list[dict] = field(default_factory=list)


class Worker:
    def __init__(self, registry: Path, extra: list[str] = (), python: str = sys.executable, store: Path | None = None):
        self.registry = Path(registry)
        self.store = store_dir(registry, store)
        self.jobs, self.files = JobStore(registry, store), FileStore(registry, store)
        self.extra, self.python = list(extra), python
        self.parent: int | None = None  # forever(parent=...): the server whose exit ends this worker, even mid-job
        self.terminating = False  # set by SIGTERM (stop_on_sigterm): stop the run, leave the job to resume, exit

    def stop_on_sigterm(self) -> None:
        """SIGTERM (a server stopping its worker, `docker stop`, a pod's termination) stops the running job's
        training process group before this worker exits. The run lives in its own session, so without this it
        outlived the worker, and the next worker resumed the same job beside it on the same run folder."""
        def handler(signum, frame) -> None:
            self.terminating = True

        signal.signal(signal.SIGTERM, handler)

    def _must_stop(self) -> bool:
        """SIGTERM came, or the server that started this worker is gone."""
        return self.terminating or (self.parent is not None and os.getppid() != self.parent)

    # -- the queue -----------------------------------------------------------------------------------
    def recover(self) -> None:
        """Jobs left `running` by a worker that died: queued again, to resume from their last checkpoint."""
        for job in self.jobs.list():
            if job.status == "running" and not self.jobs.claimed_by_live_process(job.id):
                self.jobs.release(job.id)
                job.status, job.spec.resume = "queued", True
                self.jobs.save(job)
                self.jobs.event(job.id, "Worker restarted: the job is queued again and resumes from its last checkpoint")

    def once(self) -> Job | None:
        """Run the oldest queued job to its end; None when the queue is empty."""
        for job in self.jobs.queued():
            if self.jobs.cancel_requested(job.id) or not self.jobs.claim(job.id):
                continue  # cancelled while queued (the API marks it), or another worker took it
            try:
                return self.run(job)
            finally:
                self.jobs.release(job.id)
        return None

    def one(self, jid: str) -> Job:
        """Run job `jid` (a Kubernetes Job's pod runs exactly one); a retried pod resumes it from its checkpoint."""
        job = self.jobs.get(jid)
        if job.status == "running" and not self.jobs.claimed_by_live_process(jid):
            self.jobs.release(jid)
            job.status, job.spec.resume = "queued", True
            self.jobs.save(job)
            self.jobs.event(jid, "Retried: the job resumes from its last checkpoint")
        if job.status != "queued" or self.jobs.cancel_requested(jid) or not self.jobs.claim(jid):
            return job  # finished, cancelled, or another pod holds it
        try:
            return self.run(job)
        finally:
            self.jobs.release(jid)

    def forever(self, poll: float, parent: int | None = None) -> None:
        """Run jobs as they come; with `parent`, exit once that process is gone (a server killed with -9)."""
        self.parent = parent
        while not self._must_stop():
            self.recover()  # also between jobs: a worker that died while this one was busy left its job `running`
            if self.once() is None:
                time.sleep(poll)

    # -- one job -----------------------------------------------------------------------------------------
    def run(self, job: Job) -> Job:
        run_dir = self.jobs.run_dir(job.id)  # where the API reads the run back (artifacts owns the path)
        try:
            command = self._command(job, run_dir)
        except ConfigError as e:  # a spec no config can be built from (an older server's): the job fails, the worker goes on
            return self._invalid(job, str(e))
        job.status = "running"
        self.jobs.save(job)
        self.jobs.event(job.id, "Fine-tuning job started")
        log_path = run_dir.parent / f"{job.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc, cancelled = self._watch(job, proc, RunDir(run_dir))
        job = self.jobs.get(job.id)
        job.finished_at = int(time.time())
        if cancelled:
            job.status = "cancelled"
            self.jobs.event(job.id, "Fine-tuning job cancelled; nothing was published")
        elif rc == 0:
            self._succeeded(job, RunDir(run_dir))
        else:
            job.status = "failed"
            message = _last_error(log_path)
            gate = rc == 2 and message.startswith("refusing to publish")  # the gate's one line, both numbers in it
            job.error = {"code": "publish_gate_refused" if gate else "training_failed" if rc != 2 else "invalid_training_run",
                         "message": message, "param": None}
            self.jobs.event(job.id, f"Fine-tuning job failed: {job.error['message']}", level="error")
        self.jobs.save(job)
        return job

    def _command(self, job: Job, run_dir: Path) -> list[str]:
        config = run_dir.parent / f"{job.id}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config, self.train_config(job, run_dir).to_yaml())
        return [self.python, "-m", "train", "run", str(config), *(["--resume"] if _resumes(job, run_dir) else [])]

    def train_config(self, job: Job, run_dir: Path) -> Config:
        """The job's typed train config: the method's documented defaults and the operator's --set overrides,
        then the job's data, names and hyperparameters wherever the operator did not set that field."""
        spec = job.spec
        if spec.outdated:
            raise ConfigError(f"job {job.id}: {spec.outdated}")
        base = Registry(self.registry).base()
        if base is None:
            raise RuntimeError(f"{self.registry}: no base model registered")
        cfg = load_config(None, [f"method.name={spec.method}", *self.extra])
        hp, val = spec.hyperparameters, job.validation_file
        val = str(self.files.content(val)) if val else None
        fields = {"model.name_or_path": str(base[1]), "data.train": str(self.files.content(job.training_file)),
                  "data.validation": val,  # None: the config's split of the training file
                  "data.eval": val,  # None: task metrics on that split, never the demo's held-out file (the default)
                  "output.dir": str(run_dir), "output.registry": str(self.registry),
                  "output.overwrite": not _resumes(job, run_dir),
                  "output.adapter_name": spec.adapter_name, "training.seed": job.seed,
                  "method.rewards": list(spec.rewards) or None, "method.beta": hp.beta,
                  "training.epochs": None if hp.n_epochs is None else float(hp.n_epochs),
                  "training.batch_size": hp.batch_size,
                  "training.lr": None if hp.learning_rate_multiplier is None
                  else cfg.training.lr * hp.learning_rate_multiplier}  # OpenAI's multiplier of the method's own rate
        nullable = {"data.eval"}  # None there means "none"; elsewhere, "the config's value"
        operator = {ov.split("=", 1)[0] for ov in self.extra}
        for key, value in fields.items():
            if key not in operator and (value is not None or key in nullable):
                section, name = key.split(".", 1)
                setattr(getattr(cfg, section), name, value)
        validate(cfg)
        check_config(cfg)  # the method's own checks (rewards, group size, extras): refused before any run starts
        return cfg

    def _invalid(self, job: Job, message: str) -> Job:
        job.status, job.finished_at = "failed", int(time.time())
        job.error = {"code": "invalid_job_spec", "message": message[:2000], "param": None}
        self.jobs.save(job)
        self.jobs.event(job.id, f"Fine-tuning job failed: {message}", level="error")
        return job

    def _watch(self, job: Job, proc: subprocess.Popen, rd: RunDir) -> tuple[int | None, bool]:
        progress = Progress()
        while True:
            try:
                rc = proc.wait(timeout=CHECK_SECONDS)
            except subprocess.TimeoutExpired:
                rc = None
            self._report(job, rd, progress)
            if rc is not None:
                return rc, False
            if self._must_stop():
                # SIGTERM, or the server that started this worker is gone (a restart): stop the run and leave the
                # job `running`, as a killed worker would; the next worker resumes it from its checkpoint
                _stop(proc)
                self.jobs.event(job.id, "Worker stopped: the job resumes from its last checkpoint on the next worker")
                os._exit(TERMINATED)
            if self.jobs.cancel_requested(job.id):
                _stop(proc)
                return None, True

    def _report(self, job: Job, rd: RunDir, progress: Progress) -> None:
        """New logged steps become events; new complete checkpoints join the job's checkpoint list."""
        rows = _metrics(rd)
        for r in rows[progress.steps_seen:]:
            if "loss" in r:
                self.jobs.event(job.id, f"Step {r['step']}: training loss={r['loss']:.4f}", type="metrics",
                                data={"step": r["step"], "train_loss": r["loss"]})
            elif "eval_loss" in r:
                self.jobs.event(job.id, f"Step {r['step']}: validation loss={r['eval_loss']:.4f}", type="metrics",
                                data={"step": r["step"], "valid_loss": r["eval_loss"]})
        progress.steps_seen = len(rows)
        ckpts = _checkpoints(job, rd, rows)
        if [c["step_number"] for c in ckpts] != [c["step_number"] for c in progress.checkpoints]:
            progress.checkpoints = ckpts
            fresh = self.jobs.get(job.id)
            fresh.spec.checkpoints = ckpts
            self.jobs.save(fresh)

    def _succeeded(self, job: Job, rd: RunDir) -> None:
        ev = json.loads(rd.eval.read_text()) if rd.eval.is_file() else {}
        report = json.loads(rd.data_report.read_text()) if rd.data_report.is_file() else {}
        job.status, job.fine_tuned_model = "succeeded", job.spec.fine_tuned_model
        tokens = (report.get("tokens") or {}).get("train", {}).get("tokens")
        steps = ev.get("train_steps") or 0
        # rows seen x their mean length (OpenAI counts tokens over all epochs)
        job.trained_tokens = int(tokens / _rows(report) * steps * _batch(rd)) if tokens else None
        job.result_files = [self._result_file(job, rd)]
        head = ev.get("headline") or {}
        self.jobs.event(job.id, f"Evaluation: {head.get('metric', 'metric')} base {head.get('base', 0):.3f} -> "
                                f"tuned {head.get('tuned', 0):.3f}", data={"evaluation": head})
        self.jobs.event(job.id, f"New fine-tuned model created: {job.fine_tuned_model}")
        self._publish_checkpoints(job, rd)
        self.jobs.event(job.id, "The job has successfully completed")

    def _publish_checkpoints(self, job: Job, rd: RunDir) -> None:
        """Each listed checkpoint becomes servable as its `fine_tuned_model_checkpoint` name (the registry
        adapter `ft-<id>-step-<N>`). Only for a job that succeeded: a refused job's checkpoints stay listed,
        not served, as the gate refused the run."""
        reg = Registry(self.registry)
        for c in job.spec.checkpoints:
            adapter, _ = checkpoint_names(job.spec.adapter_name, job.spec.fine_tuned_model, c["step_number"])
            try:
                reg.publish_checkpoint(rd.root, c["step_number"], adapter)
            except (RegistryError, OSError) as e:
                self.jobs.event(job.id, f"Checkpoint at step {c['step_number']} not served: {e}", level="warn")

    def _result_file(self, job: Job, rd: RunDir) -> str:
        """OpenAI's step metrics CSV (step, train_loss, valid_loss), stored as a file of the job's owner."""
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["step", "train_loss", "valid_loss"])
        evals = {r["step"]: r["eval_loss"] for r in _metrics(rd) if "eval_loss" in r}
        for r in _metrics(rd):
            if "loss" in r:
                w.writerow([r["step"], r["loss"], evals.get(r["step"], "")])
        with tempfile.NamedTemporaryFile("w", dir=self.files.root.parent, delete=False, suffix=".csv") as tmp:
            tmp.write(out.getvalue())
        return self.files.add(Path(tmp.name), "step_metrics.csv", "fine-tune-results", job.owner).id


def _metrics(rd: RunDir) -> list[dict]:
    if not rd.metrics_log.is_file():
        return []
    rows = []
    for line in rd.metrics_log.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return rows


def _checkpoints(job: Job, rd: RunDir, rows: list[dict]) -> list[dict]:
    out = []
    for d in sorted(rd.checkpoints.glob("checkpoint-*")) if rd.checkpoints.is_dir() else []:
        if not (d / "trainer_state.json").is_file():  # written last by the Trainer: the checkpoint is complete
            continue
        step = int(d.name.split("-")[1])
        _, model = checkpoint_names(job.spec.adapter_name, job.spec.fine_tuned_model, step)
        out.append({"id": f"ftckpt-{job.id.split('-', 1)[1][:8]}-{step}", "created_at": int(d.stat().st_mtime),
                    "step_number": step, "metrics": {"step": step, "train_loss": loss_at(rows, step)},
                    "fine_tuned_model_checkpoint": model})
    return out


def _resumes(job: Job, run_dir: Path) -> bool:
    """A restarted job with a checkpoint and no finished run resumes; anything else starts over."""
    return job.spec.resume and (run_dir / "checkpoints").is_dir() and not (run_dir / "manifest.json").exists()


def _batch(rd: RunDir) -> int:
    """The batch size the run trained with (its resolved config.yaml), else 1."""
    try:
        return int(yaml.safe_load(rd.config.read_text())["training"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return 1


def _rows(report: dict) -> int:
    return (report.get("tokens") or {}).get("train", {}).get("rows") or 1


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group, then SIGKILL after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _last_error(log: Path) -> str:
    """The run's one-line `error: ...` (bad data, a refused gate), else the last line it printed."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    return (errors[-1] if errors else lines[-1] if lines else "the training process exited")[:2000]
