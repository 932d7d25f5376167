"""The files and fine-tuning jobs API's bodies, as pydantic models: /openapi.json is generated from them,
and POST /v1/fine_tuning/jobs is parsed with JobCreateRequest, so the spec says what the server does."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import parse_body
from serve.schema import bounded_int

_REQ = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
Auto = Literal["auto"]
PositiveInt = bounded_int(1, 1_000_000)  # 1.0 is an integer in JSON Schema, so it is taken too
PositiveFloat = Annotated[float, Field(gt=0, le=1000)]
STATES = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class Hyperparameters(BaseModel):
    model_config = _REQ
    n_epochs: Auto | PositiveInt | None = None
    batch_size: Auto | bounded_int(1, 4096) | None = None
    learning_rate_multiplier: Auto | PositiveFloat | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | PositiveFloat | None = None


class StringCheckGrader(BaseModel):
    """The grader this server can run: string_check, as the `exact` (eq) or `keyword` (like, ilike) reward."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["string_check"]
    operation: Literal["eq", "like", "ilike"]
    name: str | None = None
    input: str | None = None
    reference: str | None = None


class _Supervised(BaseModel):
    model_config = _REQ
    hyperparameters: Hyperparameters | None = None


class _Dpo(BaseModel):
    model_config = _REQ
    hyperparameters: DpoHyperparameters | None = None


class _Reinforcement(BaseModel):
    model_config = _REQ
    grader: StringCheckGrader
    hyperparameters: Hyperparameters | None = None


class SupervisedMethod(BaseModel):
    model_config = _REQ
    type: Literal["supervised"]
    supervised: _Supervised | None = None


class DpoMethod(BaseModel):
    model_config = _REQ
    type: Literal["dpo"]
    dpo: _Dpo | None = None


class ReinforcementMethod(BaseModel):
    model_config = _REQ
    type: Literal["reinforcement"]
    reinforcement: _Reinforcement


Method = Annotated[Union[SupervisedMethod, DpoMethod, ReinforcementMethod], Field(discriminator="type")]


class JobCreateRequest(BaseModel):
    """POST /v1/fine_tuning/jobs. Fields OpenAI has and this server does not are refused (extra=forbid)."""

    model_config = _REQ
    model: str = Field(description="the served base model (GET /v1/models)")
    training_file: str = Field(min_length=1, description="an uploaded file's id (purpose fine-tune)")
    validation_file: Annotated[str, Field(min_length=1)] | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="legacy; prefer method.<type>.hyperparameters")
    method: Method | None = None
    suffix: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")] | None = None
    seed: bounded_int(0, 2**31 - 1) | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    integrations: Annotated[list[Any], Field(max_length=0)] | None = Field(
        None, description="not supported: only an empty list or null")

    @classmethod
    def parse(cls, body: Any) -> "JobCreateRequest":
        return parse_body(cls, body)


class PublishRequest(BaseModel):
    """POST /v1/fine_tuning/jobs/{id}/publish."""

    model_config = _REQ
    override_reason: Annotated[str, Field(min_length=1, max_length=1000, pattern=r"\S")] | None = Field(
        None, description="why to publish although the gate refused (recorded in the manifest); null: the gate decides")

    @classmethod
    def parse(cls, body: Any) -> "PublishRequest":
        return parse_body(cls, body)


# -- responses ---------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"]
    model: str
    training_file: str
    created_at: int
    status: STATES
    validation_file: str | None
    fine_tuned_model: str | None
    finished_at: int | None
    estimated_finish: int | None
    error: JobError | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    metadata: dict[str, str] | None
    organization_id: str
    result_files: list[str]
    seed: int
    suffix: str | None
    trained_tokens: int | None
    integrations: list[Any]


class _Page(BaseModel):
    object: Literal["list"]
    has_more: bool
    first_id: str | None
    last_id: str | None


class JobList(_Page):
    data: list[FineTuningJob]


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any]
    type: Literal["message", "metrics"]


class EventList(_Page):
    data: list[JobEvent]


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    fine_tuning_job_id: str
    created_at: int
    step_number: int
    metrics: dict[str, Any]
    fine_tuned_model_checkpoint: str


class CheckpointList(_Page):
    data: list[Checkpoint]


# one valid chat row: the example a client (or Schemathesis's stateful phase) can upload and train on
EXAMPLE_JSONL = ('{"messages": [{"role": "user", "content": "Say hi."}, '
                 '{"role": "assistant", "content": "Hi!"}]}\n')
UPLOAD_SCHEMA = {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary", "contentMediaType": "application/jsonl",
             "description": "JSONL (or .csv) rows in one training format: chat `messages`, instruction/output, "
                            "prompt/completion, text/label or prompt/chosen/rejected. Every row is checked: the first "
                            "bad one is a 400 naming FILE line N and the field, and nothing is stored."},
    "purpose": {"type": "string", "enum": ["fine-tune"]}},
    "example": {"file": EXAMPLE_JSONL, "purpose": "fine-tune"}}
UPLOAD_ENCODING = {"file": {"contentType": "application/jsonl, text/csv, application/octet-stream"}}
MODELS = [JobCreateRequest, PublishRequest, FileObject, FileList, FileDeleted, FineTuningJob, JobList, JobEvent, EventList,
          Checkpoint, CheckpointList]
