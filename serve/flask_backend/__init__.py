"""SERVE_BACKEND=flask: the OpenAI API served by an in-process engine (PyTorch or ONNX Runtime)."""
