"""ONNX Runtime target (see target.py)."""

from targets.onnxruntime.target import OnnxRuntimeOptions, OnnxRuntimeTarget

__all__ = ["OnnxRuntimeOptions", "OnnxRuntimeTarget"]
