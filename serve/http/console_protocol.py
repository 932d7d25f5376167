"""The console API's bodies (registry, evidence, metrics series, preview, methods, keys), as pydantic models:
/openapi.json is generated from them, and the request bodies are parsed with them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.finetune.protocol import PublishRequest

_REQ = ConfigDict(strict=True, extra="forbid")
VERSION = r"^v[1-9][0-9]{0,5}$"  # artifacts/registry.py's versions


class Me(BaseModel):
    object: Literal["key"]
    name: str | None = Field(description="the key's name (keys file, api_key or admin_key); null without a key")
    scopes: list[Literal["inference", "finetune", "admin"]]


class Score(BaseModel):
    base: float | None
    tuned: float | None
    ratio: float | None = Field(description="tuned / base; 1.0 kept everything")


class TaskScore(BaseModel):
    metric: str | None
    base: float | None
    tuned: float | None
    gain: float | None = Field(description="tuned - base, in points")


class LostExample(BaseModel):
    category: str | None
    prompt: str | None
    base_answer: str | None
    tuned_answer: str | None


class Retention(BaseModel):
    overall: Score
    by_category: dict[str, Score]
    lost_examples: list[LostExample] = Field(description="general-set prompts the base answered right and the "
                                                         "tuned model wrong (at most 20)")


class GateVerdict(BaseModel):
    passed: bool
    reasons: list[str]
    forced: bool = Field(description="published although the gate refused, with override_reason")
    override_reason: str | None


class Evidence(BaseModel):
    task: TaskScore | None
    retention: Retention | None
    kl: float | None = Field(description="KL(tuned || base) per token on the general set")
    gate: GateVerdict | None


class RegistryVersion(BaseModel):
    version: str = Field(pattern=VERSION)
    created_at: int
    serving: bool
    evidence: Evidence | None


class RegistryEntry(BaseModel):
    name: str
    kind: Literal["adapter", "model"]
    serving_version: str | None
    versions: list[RegistryVersion]


class RegistryList(BaseModel):
    object: Literal["list"]
    data: list[RegistryEntry]


class RollbackRequest(BaseModel):
    model_config = _REQ
    version: str = Field(pattern=VERSION, description="a kept version (GET /v1/registry/models/{name})")


class MetricsPoint(BaseModel):
    step: int
    epoch: float | None
    train_loss: float | None
    valid_loss: float | None
    learning_rate: float | None


class MetricsList(BaseModel):
    object: Literal["list"]
    data: list[MetricsPoint]


class Segment(BaseModel):
    role: str
    text: str
    loss: bool = Field(description="these tokens carry loss in training")


class PreviewRow(BaseModel):
    line: int
    messages: list[dict[str, Any]]
    segments: list[Segment]


class PreviewList(BaseModel):
    object: Literal["list"]
    data: list[PreviewRow]


class MethodParameter(BaseModel):
    type: Literal["integer", "number"]
    default: float
    config: str = Field(description="the train config field it sets")
    config_default: float | None = None
    reason: str


class FineTuningMethod(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    training_method: str
    hyperparameters: dict[str, MethodParameter]


class MethodList(BaseModel):
    object: Literal["list"]
    data: list[FineTuningMethod]


MODELS = [Me, Evidence, RegistryList, RegistryEntry, RollbackRequest, PublishRequest, MetricsList, PreviewList,
          MethodList]
