"""Planted defects for quantized artifacts, shared by the tests and benchmarks/gate_calibration.py.

Each yields a wrong artifact whose hashes are consistent, so only validation can tell:
- window_off_by_one: built from a program traced with the window one short (GQA local_window_size,
  OpenVINO's mask constant and Core ML's mask all follow it);
- swapped_kv_heads: built from weights whose first two KV heads of layer 0 are swapped (k and v);
- perturbed_scale: one quantization scale of one weight multiplied by 1.5 in the artifact's files;
- low_precision_rotary: built without the targets' guard that keeps the rotary angles in fp32 (Core ML's
  fp16 pass, OpenVINO's `precise` marks), so a low-precision device computes `position * inv_freq` in
  fp16: right at the first positions, wrong by hundreds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.manifest import read_manifest, write_manifest
from exporter.trace import TracedProgram, TraceSpec, trace

SCALE_FACTOR = 1.5
KV_LAYER = 0


@contextmanager
def window_off_by_one() -> Iterator[None]:
    """Builds inside the block trace their program with sliding_window - 1 (capacity unchanged)."""
    import pipeline.build as build_module

    real = build_module.traced

    def wrong(spec: TraceSpec, use_cache: bool = True) -> Any:
        cfg = dataclasses.replace(spec.config, sliding_window=spec.config.sliding_window - 1)
        result = real(spec, use_cache)
        return TracedProgram(spec, result.cache_hit, result.seconds, program=trace(TraceSpec(cfg, spec.capacity, spec.dtype)))

    build_module.traced = wrong
    try:
        yield
    finally:
        build_module.traced = real


def _swap_heads(name: str, tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    if name not in {f"model.layers.{KV_LAYER}.self_attn.{p}.weight" for p in ("k_proj", "v_proj")}:
        return tensor
    return torch.cat([tensor[head_dim:2 * head_dim], tensor[:head_dim], tensor[2 * head_dim:]])


@contextmanager
def swapped_kv_heads() -> Iterator[None]:
    """Builds inside the block read layer 0's k/v weights with KV heads 0 and 1 swapped."""
    import pipeline.build as build_module

    real = build_module.open_source

    def opened(checkpoint: Path | None, preset_name: str | None, adapter: Path | None = None) -> Any:
        source = real(checkpoint, preset_name, adapter)
        d = source.config.head_dim
        tensor = source.tensor
        source.tensor = lambda name, dtype: _swap_heads(name, tensor(name, dtype), d)  # type: ignore[method-assign]
        source.row_block = lambda name, a, b: _swap_heads(name, tensor(name, None), d)[a:b]  # type: ignore[method-assign]
        return source

    build_module.open_source = opened
    try:
        yield
    finally:
        build_module.open_source = real


def perturb_bytes(path: Path, values: np.ndarray, index: int = 3) -> None:
    """Find the stored bytes of `values` in the file and scale its element `index` by SCALE_FACTOR."""
    blob = bytearray(path.read_bytes())
    needle = np.ascontiguousarray(values).tobytes()
    at = blob.find(needle)
    if at < 0 or blob.find(needle, at + 1) >= 0:
        raise AssertionError(f"the scale's bytes are not found exactly once in {path.name}")
    changed = np.ascontiguousarray(values).reshape(-1).copy()
    changed[index] = changed[index] * SCALE_FACTOR
    blob[at:at + len(needle)] = changed.tobytes()
    path.write_bytes(bytes(blob))


def restamp(folder: Path) -> None:
    """Re-hash the artifact's files after a planted change, so only validation can catch it."""
    write_manifest(folder, read_manifest(folder, verify=False))


def perturbed_scale(folder: Path, weight: str = "model.layers.1.mlp.down_proj") -> None:
    """Multiply one quantization scale of `weight` by SCALE_FACTOR in the artifact's own files."""
    target = read_manifest(folder, verify=False)["target"]["name"]
    if target == "onnxruntime":
        from targets.onnxruntime.readback import _initializers

        name = f"{weight}.MatMul.weight_scales"
        perturb_bytes(folder / "model.onnx.data", _initializers(folder)[name])
    elif target == "openvino":
        import openvino as ov

        model = ov.Core().read_model(folder / "openvino_model.xml")
        const = next(op for op in model.get_ops() if op.get_friendly_name() == f"{weight}.weight/scale")
        perturb_bytes(folder / "openvino_model.bin", np.array(const.get_data()))
    elif target == "coreml":
        from targets.coreml.runner import load_mil_program

        program = load_mil_program(folder / "model.mlpackage")
        key = "p_canonical_" + weight.replace(".", "_") + "_weight_to_fp16_quantized"
        op = next(o for o in program.functions["decode"].operations if o.name == key)
        weights = folder / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        perturb_bytes(weights, np.asarray(op.scale.val))
    else:
        raise ValueError(f"no scale to perturb in a {target} artifact")
    restamp(folder)


@contextmanager
def low_precision_rotary() -> Iterator[None]:
    """Builds inside the block leave the rotary angles to the device's compute precision."""
    from targets.coreml import fp16_pass
    from targets.openvino import marks

    real = fp16_pass.rotary_ops, marks.rotary_nodes
    fp16_pass.rotary_ops = lambda prog: set()  # type: ignore[assignment]
    marks.rotary_nodes = lambda model: set()  # type: ignore[assignment]
    try:
        yield
    finally:
        fp16_pass.rotary_ops, marks.rotary_nodes = real
