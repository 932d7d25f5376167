"""Inference engines behind the Flask backend. Each owns a model and a batching loop on one thread."""

from serve.engines.base import Engine, GenRequest, SamplingParams

__all__ = ["Engine", "GenRequest", "SamplingParams"]
