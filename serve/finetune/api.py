"""OpenAI's files and fine-tuning jobs API: record, validate and enqueue; a worker trains.

    POST   /v1/files                               multipart: file + purpose=fine-tune
    GET    /v1/files, /v1/files/{id}, /v1/files/{id}/content;  DELETE /v1/files/{id}
    POST   /v1/fine_tuning/jobs                    model, training_file, method, hyperparameters, ...
    GET    /v1/fine_tuning/jobs (after, limit), /v1/fine_tuning/jobs/{id}
    POST   /v1/fine_tuning/jobs/{id}/cancel
    GET    /v1/fine_tuning/jobs/{id}/events, /v1/fine_tuning/jobs/{id}/checkpoints

Uploads are validated row by row with the training stage's own readers (lm/data), so a file the
trainer would refuse is refused here, with its line and field. Files and jobs live in the registry
volume (artifacts/finetune.py); the serving process never trains.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, request, send_file

from artifacts.finetune import (FINAL, FileStore, Hyperparameters, Job, JobSpec, JobStore, NotFound, job_model_names,
                                new_id, page)
from lm.data.formats import load_examples
from lm.errors import DataError
from serve.errors import APIError, bad_request
from serve.finetune.protocol import JobCreateRequest
from serve.settings import Settings

METHODS = {"supervised": "lora", "dpo": "dpo", "reinforcement": "grpo"}  # OpenAI method type -> training method


def owner_of(api_key: str) -> str | None:
    """Who a request is, for scoping files and jobs: a digest of its key (None without auth)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else None


def _validate_upload(path: Path, filename: str) -> None:
    try:
        load_examples(path, "auto")
    except DataError as e:  # "TMP:line: field: reason" -> "FILENAME line N: field: reason"
        msg = str(e).replace(str(path), filename, 1)
        raise bad_request(f"Invalid file format: {msg}", "file", "invalid_file_format") from None


GRADER_REWARDS = {"eq": "exact", "like": "keyword", "ilike": "keyword"}  # string_check operation -> GRPO reward


def _job_spec(req: JobCreateRequest, adapter: str, model: str) -> tuple[str, JobSpec]:
    """The method type and the job's typed spec: method.<type>.hyperparameters over the legacy top-level
    ones; "auto" and unset stay None, so the worker applies the train config's own defaults."""
    kind = req.method.type if req.method else "supervised"
    inner = getattr(req.method, kind, None) if req.method else None
    hp: dict[str, Any] = {}
    for source in (req.hyperparameters, getattr(inner, "hyperparameters", None)):
        if source is not None:
            hp.update({k: v for k, v in source.model_dump(exclude_none=True).items() if v != "auto"})
    rewards = [GRADER_REWARDS[inner.grader.operation]] if kind == "reinforcement" else []
    return kind, JobSpec(METHODS[kind], Hyperparameters(**hp), rewards, adapter, model)


class FineTuneAPI:
    def __init__(self, registry: Path, base_model: Callable[[], str], max_upload_bytes: int, api_key: str,
                 submit: Callable[[Job], str] | None = None, store: Path | None = None,
                 caller: Callable[[], Any] | None = None):
        """submit: hands a queued job to a runner that starts it (Kubernetes); None = a worker polls the queue.
        store: where files and jobs live (None: <registry>/.finetune). caller: the request's Caller
        (serve/http/keys.py: its owner, and whether it reads every owner's); None: everything is `api_key`'s."""
        self.files, self.jobs = FileStore(registry, store), JobStore(registry, store)
        self.base_model, self.max_upload, self.default_owner = base_model, max_upload_bytes, owner_of(api_key)
        self.submit, self.caller = submit, caller

    @property
    def owner(self) -> str | None:
        """Who the request is, for what it creates and sees: its key's digest (None without keys)."""
        c = self.caller() if self.caller else None
        return c.owner if c is not None else self.default_owner

    def reader(self) -> str | None:
        """The owner filter of what this request may read: an admin key reads every owner's files and jobs."""
        c = self.caller() if self.caller else None
        return None if c is not None and c.reads_all else self.owner

    # -- files -------------------------------------------------------------------------------------
    def upload(self) -> dict[str, Any]:
        purpose = request.form.get("purpose")
        if purpose != "fine-tune":
            raise bad_request(f"purpose must be 'fine-tune' (got {purpose!r}): this server stores training data only",
                              "purpose")
        f = request.files.get("file")
        if f is None and "file" not in request.form:
            raise bad_request("a multipart 'file' part is required", "file")
        name = Path(f.filename).name if f is not None and f.filename else "file.jsonl"
        self.files.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.files.root, prefix=".upload-", suffix=Path(name).suffix,
                                         delete=False) as tmp:
            if f is not None:
                f.save(tmp)
            else:  # the part came without a filename: a plain form field holds the content
                tmp.write(request.form["file"].encode("utf-8", "surrogateescape"))
        path = Path(tmp.name)
        try:
            if path.stat().st_size > self.max_upload:
                raise APIError(413, f"file exceeds {self.max_upload} bytes", "file")
            _validate_upload(path, name)
            return self.files.add(path, name, purpose, self.owner).public()
        finally:
            path.unlink(missing_ok=True)

    def file(self, fid: str):
        return self._found(lambda: self.files.get(fid, self.reader())).public()

    def content(self, fid: str) -> Response:
        path = self._found(lambda: self.files.content(fid, self.reader()))
        return send_file(path, mimetype="application/octet-stream")

    def delete(self, fid: str) -> dict[str, Any]:
        self._found(lambda: self.files.delete(fid, self.reader()))
        return {"id": fid, "object": "file", "deleted": True}

    def list_files(self) -> dict[str, Any]:
        return {"object": "list", "data": [r.public() for r in self.files.list(self.reader(), request.args.get("purpose"))],
                "has_more": False}

    # -- jobs ------------------------------------------------------------------------------------------
    def create_job(self, body: Any) -> dict[str, Any]:
        req = JobCreateRequest.parse(body)  # types, ranges and unsupported fields: 400 naming the field
        base = self.base_model()
        if req.model != base:
            raise bad_request(f"model {req.model!r} cannot be fine-tuned here; the base model is {base!r}",
                              "model", "model_not_available")
        train = self._input_file(req.training_file, "training_file")
        val = self._input_file(req.validation_file, "validation_file") if req.validation_file else None
        jid = new_id("ftjob")
        kind, spec = _job_spec(req, *job_model_names(base, req.suffix, jid.split("-", 1)[1][:8]))
        shown = spec.hyperparameters.public()
        job = Job(jid, base, train, int(time.time()), status="queued", validation_file=val, seed=req.seed or 0,
                  suffix=req.suffix, metadata=req.metadata, hyperparameters=shown,
                  method={"type": kind, kind: {"hyperparameters": shown}}, owner=self.owner, spec=spec)
        self.jobs.create(job)
        self.jobs.event(jid, "Created fine-tuning job")
        self.jobs.event(jid, "Validated training file: " + train)
        if self.submit is not None:
            self._submit(job)
        return self.jobs.get(jid).public()

    def _submit(self, job: Job) -> None:
        try:
            name = self.submit(job)
        except Exception as e:  # noqa: BLE001 - a runner failure fails the job, it is not the client's error
            job.status, job.finished_at = "failed", int(time.time())
            job.error = {"code": "runner_error", "message": f"could not start the training Job: {e}"[:2000], "param": None}
            self.jobs.save(job)
            self.jobs.event(job.id, job.error["message"], level="error")
            return
        self.jobs.event(job.id, f"Submitted as Kubernetes Job {name}")

    def _input_file(self, fid: Any, param: str) -> str:
        if not isinstance(fid, str) or not fid:
            raise bad_request(f"{param} is required", param)
        try:
            rec = self.files.get(fid, self.owner)
        except NotFound:
            raise APIError(404, f"invalid {param}: no file {fid!r}", param, "file_not_found") from None
        if rec.purpose != "fine-tune":
            raise bad_request(f"{param}: file {fid} has purpose {rec.purpose!r}, not 'fine-tune'", param)
        return fid

    def job(self, jid: str) -> dict[str, Any]:
        return self._found(lambda: self.jobs.get(jid, self.reader())).public()

    def list_jobs(self) -> dict[str, Any]:
        items = [j.public() for j in self.jobs.list(self.reader())]
        return page(items, request.args.get("after"), _limit())

    def cancel(self, jid: str) -> dict[str, Any]:
        job = self._found(lambda: self.jobs.get(jid, self.reader()))
        if job.status in FINAL:
            raise bad_request(f"job {jid} has already {job.status}", "fine_tuning_job_id")
        self.jobs.request_cancel(jid)
        if job.status == "queued":  # no worker holds it: cancelled at once (the worker skips it)
            job.status, job.finished_at = "cancelled", int(time.time())
            self.jobs.save(job)
            self.jobs.event(jid, "Fine-tuning job cancelled")
        return self.jobs.get(jid).public()

    def events(self, jid: str) -> dict[str, Any]:
        self._found(lambda: self.jobs.get(jid, self.reader()))
        return page(self.jobs.events(jid), request.args.get("after"), _limit())

    def checkpoints(self, jid: str) -> dict[str, Any]:
        job = self._found(lambda: self.jobs.get(jid, self.reader()))
        items = sorted(job.spec.checkpoints, key=lambda c: -c["step_number"])
        return page([{"object": "fine_tuning.job.checkpoint", "fine_tuning_job_id": jid, **c} for c in items],
                    request.args.get("after"), _limit())

    @staticmethod
    def _found(fn: Callable):
        try:
            return fn()
        except NotFound as e:
            raise APIError(404, f"No such object: {e.args[0]}", None, "not_found") from None


def from_settings(settings: Settings, base_model: Callable[[], str],
                  caller: Callable[[], Any] | None = None) -> FineTuneAPI:
    """The API as the settings configure it: with SERVE_FINETUNE_WORKER=k8s, each job is submitted as a Kubernetes Job."""
    submit = None
    if settings.finetune_worker == "k8s":
        from serve.finetune.k8s_runner import K8sRunner

        submit = K8sRunner(settings.finetune_job_template, settings.finetune_namespace).submit
    return FineTuneAPI(settings.registry, base_model, settings.max_upload_bytes, settings.api_key, submit,
                       settings.finetune_dir or None, caller)


def _limit() -> int:
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad_request("limit must be an integer in [1, 100]", "limit")
    return int(raw)


def routes(app: Flask, api: FineTuneAPI, json_body: Callable[[bytes], Any], respond: Callable[..., Response]) -> None:
    app.add_url_rule("/v1/files", "files_upload", lambda: respond(api.upload()), methods=["POST"])
    app.add_url_rule("/v1/files", "files_list", lambda: respond(api.list_files()), methods=["GET"])
    app.add_url_rule("/v1/files/<fid>", "files_get", lambda fid: respond(api.file(fid)), methods=["GET"])
    app.add_url_rule("/v1/files/<fid>", "files_delete", lambda fid: respond(api.delete(fid)), methods=["DELETE"])
    app.add_url_rule("/v1/files/<fid>/content", "files_content", api.content, methods=["GET"])
    app.add_url_rule("/v1/fine_tuning/jobs", "jobs_create",
                     lambda: respond(api.create_job(json_body(request.get_data(cache=False)))), methods=["POST"])
    app.add_url_rule("/v1/fine_tuning/jobs", "jobs_list", lambda: respond(api.list_jobs()), methods=["GET"])
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>", "jobs_get", lambda jid: respond(api.job(jid)), methods=["GET"])
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>/cancel", "jobs_cancel", lambda jid: respond(api.cancel(jid)),
                     methods=["POST"])
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>/events", "jobs_events", lambda jid: respond(api.events(jid)),
                     methods=["GET"])
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>/checkpoints", "jobs_checkpoints",
                     lambda jid: respond(api.checkpoints(jid)), methods=["GET"])
