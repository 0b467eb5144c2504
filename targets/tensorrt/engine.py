"""Engine build with TensorRT's Python API: ONNX parser, strongly typed network, two profiles,
timing cache, builder optimization level. Runs only where `tensorrt` imports and a CUDA GPU exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.errors import UserError
from targets.tensorrt.plan import Profile

ENGINE_FILE = "engine.plan"


def gpu_fingerprint() -> dict[str, Any]:
    """What an engine is tied to: the TensorRT version and the GPU's compute capability (SM)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "sm": f"{major}.{minor}", "gpu": torch.cuda.get_device_name()}


def build_engine(onnx_path: Path, out: Path, plans: list[Profile], optimization_level: int,
                 timing_cache: Path | None) -> dict[str, Any]:
    """Parse the ONNX, build and serialize the engine to out/engine.plan; returns manifest fields."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: every tensor keeps the ONNX dtype (fp16/bf16/fp32 chosen at export), no autotuned casts.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    for plan in plans:
        profile = builder.create_optimization_profile()
        for name, shape in plan.shapes.items():
            profile.set_shape(name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    (out / ENGINE_FILE).write_bytes(bytes(serialized))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    attention_layers = sum(1 for i in range(network.num_layers)
                           if "ATTENTION" in str(network.get_layer(i).type).upper())
    return {**gpu_fingerprint(), "engine": ENGINE_FILE, "attention_layers": attention_layers}


def check_compatible(recorded: dict[str, Any]) -> None:
    """Refuse an engine built for another TensorRT version or GPU architecture, before deserializing."""
    here = gpu_fingerprint()
    for key in ("tensorrt", "sm"):
        if recorded.get(key) != here[key]:
            raise UserError(f"engine.plan was built for {key} {recorded.get(key)}, this machine has {here[key]}; "
                            "rebuild the engine here (build_engine.sh or mistral-export build --target tensorrt)")
