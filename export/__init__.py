"""Export: turn a run's weights into deployable artifacts (merged weights now; ONNX/TensorRT next)."""
