"""Field types the API protocols share (openai/, finetune/), exact in their JSON schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _integral(v: Any) -> Any:
    """1.0 is the integer 1 in JSON Schema, so the server takes it too; 1.5 stays an error."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def bounded_int(lo: int, hi: int) -> Any:
    """An integer in [lo, hi] (the bounds precede the validator so they land in the JSON schema)."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]
