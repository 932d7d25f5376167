"""SERVE_BACKEND=vllm: a vLLM child process (plan, command, child) behind a metrics proxy."""
