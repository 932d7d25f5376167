"""The fine-tuning API's on-disk contract: uploaded files and jobs, kept in the registry volume.

    <registry>/.finetune/files/<file-id>/meta.json     the OpenAI file object (+ sha256, owner)
    <registry>/.finetune/files/<file-id>/content       the bytes as uploaded
    <registry>/.finetune/jobs/<job-id>/job.json        the OpenAI fine-tuning job object (+ owner, run dir)
    <registry>/.finetune/jobs/<job-id>/events.jsonl    one event object per line, oldest first
    <registry>/.finetune/jobs/<job-id>/cancel          present once a cancel was asked for
    <registry>/.finetune/runs/<job-id>/                the job's training run (RunDir), written by the worker

Serving writes files and queued jobs; a worker (`python -m train worker`) claims queued jobs and
writes their progress. A job's `spec` (JobSpec) is typed and holds no default of its own: what the
client left unset stays None, and the worker builds the train config from the config's own defaults. Both sides only use this module, so neither imports the other. Every file is
written atomically (temp + rename): a reader sees the old or the new version, never half of one.
The folder starts with '.', so the registry's listing of adapters never sees it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artifacts.atomic import atomic_dir, atomic_write_text
from artifacts.checksums import sha256_file

ROOT = ".finetune"
STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


def job_model_names(base: str, suffix: str | None, short: str) -> tuple[str, str]:
    """A job's registry adapter and the model name clients call it by (OpenAI's `ft:<base>:<suffix>:<id>`)."""
    return f"ft-{short}", f"ft:{base}:{suffix or ''}:{short}"


def checkpoint_names(adapter: str, model: str, step: int) -> tuple[str, str]:
    """A job checkpoint's registry adapter and model name (OpenAI's `<fine_tuned_model>:ckpt-step-<N>`)."""
    return f"{adapter}-step-{step}", f"{model}:ckpt-step-{step}"


def adapter_of(model: str, base: str) -> str | None:
    """The registry adapter a fine-tuned model name refers to (None: not such a name for this base)."""
    parts = model.split(":")
    if parts[0] != "ft" or len(parts) not in (4, 5) or parts[1] != base or not parts[3]:
        return None
    if len(parts) == 4:
        return f"ft-{parts[3]}"
    step = parts[4].removeprefix("ckpt-step-")
    return f"ft-{parts[3]}-step-{step}" if parts[4].startswith("ckpt-step-") and step.isdigit() else None


def loss_at(history: list[dict[str, Any]], step: int) -> float | None:
    """A checkpoint's training loss: the last logged loss at or before its step (the Trainer logs every
    logging_steps, not at each save). `history`: the Trainer's log_history, or the run's metrics log."""
    logged = [h for h in history if "loss" in h and h.get("step", 0) <= step]
    return max(logged, key=lambda h: h.get("step", 0))["loss"] if logged else None


class NotFound(KeyError):
    """No such file or job (or it belongs to another key's owner)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    sha256: str
    owner: str | None = None
    object: str = "file"
    status: str = "processed"

    def public(self) -> dict[str, Any]:
        """The OpenAI file object (the owner stays on disk)."""
        return {k: v for k, v in asdict(self).items() if k != "owner"}


def store_dir(registry: str | Path, store: str | Path | None = None) -> Path:
    """Where files and jobs live: `store`, else <registry>/.finetune (compose mounts the registry read-only
    into serve and gives the API a writable store volume instead)."""
    return Path(store) if store else Path(registry) / ROOT


class FileStore:
    def __init__(self, registry: str | Path, store: str | Path | None = None):
        self.root = store_dir(registry, store) / "files"

    def add(self, source: Path, filename: str, purpose: str, owner: str | None) -> FileRecord:
        """Move `source` (already validated) in under a new id, atomically."""
        fid = new_id("file")
        rec = FileRecord(fid, source.stat().st_size, int(time.time()), filename, purpose, sha256_file(source), owner)
        with atomic_dir(self.root / fid) as tmp:
            shutil.move(str(source), tmp / "content")
            (tmp / "meta.json").write_text(json.dumps(asdict(rec)) + "\n")
        return rec

    def get(self, fid: str, owner: str | None = None) -> FileRecord:
        meta = self.root / _safe(fid) / "meta.json"
        try:
            rec = FileRecord(**json.loads(meta.read_text()))
        except (FileNotFoundError, NotADirectoryError, ValueError, TypeError):
            raise NotFound(fid) from None
        if owner is not None and rec.owner not in (None, owner):
            raise NotFound(fid)
        return rec

    def content(self, fid: str, owner: str | None = None) -> Path:
        self.get(fid, owner)
        return self.root / _safe(fid) / "content"

    def list(self, owner: str | None = None, purpose: str | None = None) -> list[FileRecord]:
        out = []
        for d in sorted(self.root.glob("file-*")) if self.root.is_dir() else []:
            try:
                rec = self.get(d.name, owner)
            except NotFound:
                continue
            if purpose is None or rec.purpose == purpose:
                out.append(rec)
        return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)

    def delete(self, fid: str, owner: str | None = None) -> None:
        self.get(fid, owner)
        trash = self.root / f".trash-{_safe(fid)}"
        os.rename(self.root / _safe(fid), trash)
        shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class Hyperparameters:
    """What a job asks of the trainer. None everywhere means the train config's own value (the method's
    documented default or the operator's override): this contract repeats no training default."""

    n_epochs: int | None = None  # the config's training.epochs
    batch_size: int | None = None  # the config's training.batch_size
    learning_rate_multiplier: float | None = None  # scales the config's training.lr (OpenAI's meaning)
    beta: float | None = None  # DPO: the config's method.beta

    def __post_init__(self) -> None:
        for name in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ValueError(f"hyperparameters.{name}: {v!r} is not a positive number")

    def public(self) -> dict[str, Any]:
        """OpenAI's job.hyperparameters: the three it names, "auto" where the trainer's default applies."""
        return {k: "auto" if getattr(self, k) is None else getattr(self, k)
                for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}


@dataclass
class JobSpec:
    """What a worker needs to run a job: the training method, the typed hyperparameters, the GRPO rewards,
    the names it publishes under; then the worker's own record (resume, checkpoints)."""

    method: str = ""  # the training method (train config method.name): lora | dpo | grpo
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    rewards: list[str] = field(default_factory=list)  # grpo: the config's method.rewards
    adapter_name: str = ""
    fine_tuned_model: str = ""
    resume: bool = False  # a worker restarted the job: resume from its last checkpoint
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    outdated: str | None = None  # why no worker can run it (a spec written by an older server); None: it can

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSpec":
        """A spec from job.json. An older server wrote train overrides as strings ("overrides", with the
        learning rate already multiplied out): such a job stays readable, and a worker fails it with this reason."""
        known = {k: d[k] for k in ("adapter_name", "fine_tuned_model", "resume", "checkpoints") if k in d}
        if "method" not in d:
            return cls(**known, outdated="written by an older server (train overrides as strings, not typed "
                                         "hyperparameters); create the job again")
        return cls(method=d["method"], hyperparameters=Hyperparameters(**d.get("hyperparameters") or {}),
                   rewards=list(d.get("rewards") or []), outdated=d.get("outdated"), **known)


@dataclass
class Job:
    """OpenAI's fine-tuning job object, plus what the worker needs (`spec`) and who may see it (`owner`)."""

    id: str
    model: str
    training_file: str
    created_at: int
    status: str = "validating_files"
    validation_file: str | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    error: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] | None = None
    organization_id: str = "org-local"
    result_files: list[str] = field(default_factory=list)
    seed: int = 0
    suffix: str | None = None
    trained_tokens: int | None = None
    integrations: list = field(default_factory=list)
    object: str = "fine_tuning.job"
    owner: str | None = None
    spec: JobSpec = field(default_factory=JobSpec)  # the worker's plan (typed; read from job.json's dict)
    created_ns: int = field(default_factory=time.time_ns)  # orders jobs created within one second

    def __post_init__(self) -> None:
        if isinstance(self.spec, dict):  # as json.loads gives it
            self.spec = JobSpec.from_dict(self.spec)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("owner", "spec", "created_ns")}


class JobStore:
    def __init__(self, registry: str | Path, store: str | Path | None = None):
        self.root = store_dir(registry, store) / "jobs"

    def _dir(self, jid: str) -> Path:
        return self.root / _safe(jid)

    def run_dir(self, jid: str) -> Path:
        """The training run folder of a job, <store>/runs/<job-id>: the worker writes it, the API reads it."""
        return self.root.parent / "runs" / _safe(jid)

    def create(self, job: Job) -> Job:
        with atomic_dir(self._dir(job.id)) as tmp:
            (tmp / "job.json").write_text(json.dumps(asdict(job)) + "\n")
            (tmp / "events.jsonl").write_text("")
        return job

    def save(self, job: Job) -> None:
        atomic_write_text(self._dir(job.id) / "job.json", json.dumps(asdict(job)) + "\n")

    def get(self, jid: str, owner: str | None = None) -> Job:
        try:
            job = Job(**json.loads((self._dir(jid) / "job.json").read_text()))
        except (FileNotFoundError, NotADirectoryError, ValueError, TypeError):
            raise NotFound(jid) from None
        if owner is not None and job.owner not in (None, owner):
            raise NotFound(jid)
        return job

    def list(self, owner: str | None = None) -> list[Job]:
        """Newest first (OpenAI's order)."""
        jobs = []
        for d in self.root.glob("ftjob-*") if self.root.is_dir() else []:
            try:
                jobs.append(self.get(d.name, owner))
            except NotFound:
                continue
        return sorted(jobs, key=lambda j: j.created_ns, reverse=True)

    def queued(self) -> list[Job]:
        """Jobs waiting for a worker, oldest first."""
        return sorted((j for j in self.list() if j.status == "queued"), key=lambda j: j.created_ns)

    def event(self, jid: str, message: str, level: str = "info", data: dict | None = None,
              type: str = "message") -> dict:
        ev = {"object": "fine_tuning.job.event", "id": new_id("ftevent"), "created_at": int(time.time()),
              "level": level, "message": message, "data": data or {}, "type": type}
        with open(self._dir(jid) / "events.jsonl", "a", encoding="utf-8") as f:  # one short append per event
            f.write(json.dumps(ev) + "\n")
        return ev

    def events(self, jid: str) -> list[dict]:
        """Newest first (OpenAI's order)."""
        path = self._dir(jid) / "events.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a crash mid-append
                continue
        return out[::-1]

    def claim(self, jid: str) -> bool:
        """Take a queued job for this process (False: another worker has it). The claim names host and pid."""
        try:
            fd = os.open(self._dir(jid) / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True

    def release(self, jid: str) -> None:
        (self._dir(jid) / "claim").unlink(missing_ok=True)

    def claimed_by_live_process(self, jid: str) -> bool:
        """A claim by a process still running on this host (a claim from another host counts as live)."""
        try:
            host, pid = (self._dir(jid) / "claim").read_text().split()
        except (FileNotFoundError, ValueError):
            return False
        if host != socket.gethostname():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def request_cancel(self, jid: str) -> None:
        (self._dir(jid) / "cancel").touch()

    def cancel_requested(self, jid: str) -> bool:
        return (self._dir(jid) / "cancel").exists()


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor list: items after the one with id `after`, at most `limit`, and has_more."""
    start = 0
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    chunk = items[start:start + limit]
    return {"object": "list", "data": chunk, "has_more": start + limit < len(items),
            "first_id": chunk[0]["id"] if chunk else None, "last_id": chunk[-1]["id"] if chunk else None}


def _safe(name: str) -> str:
    """An id as a single path component: anything else can name no file or job."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        return ".invalid"
    return name
