"""Inference engines behind the Flask backend. Each owns a model and a batching loop on one thread."""

from serve.engines.base import (Engine, EngineEvent, EngineStats, Failed, Finished, GenRequest, SamplingParams,
                                TextDelta)

__all__ = ["Engine", "EngineEvent", "EngineStats", "Failed", "Finished", "GenRequest", "SamplingParams", "TextDelta"]
