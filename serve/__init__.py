"""Serving: the model registry behind an OpenAI-compatible API (vLLM and Flask backends)."""
