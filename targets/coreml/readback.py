"""Read a Core ML artifact's weights back from its MIL: constexpr ops (linear quantization, LUT
palettization) materialised by coremltools' own decompression, fp16 consts as stored. Each is compared
exactly with the source weight (as fp16, what coremltools compresses) encoded again by the same
coremltools routine the compression pass calls, with the block sizes the recorded settings imply.

MIL consts keep the torch parameter names (targets/coreml/weights.py), `_quantized` or `_palettized` added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import WeightSource
from exporter.config import MistralConfig
from exporter.model import parameter_shapes
from targets.base import Readback
from targets.coreml.weights import mil_name


def _expected_blocks(precision: str, shape: tuple[int, ...], block_size: int) -> list[int]:
    """Block sizes coremltools uses for a [out, in] weight: int8 per channel, int4 per block along in."""
    return [1, shape[1]] if precision == "int8" else [1, block_size]


def _linear(op: Any, value: np.ndarray, precision: str, block_size: int) -> str | None:
    """Why a linearly quantized weight differs from the source quantized again (None: identical)."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    data, scale = op.data.val, op.scale.val
    offset = op.offset.val if op.offset is not None else None
    blocks = [d // s for d, s in zip(data.shape, scale.shape)]
    if blocks != _expected_blocks(precision, tuple(data.shape), block_size):
        return f"blocks {blocks}, the recorded settings give {_expected_blocks(precision, tuple(data.shape), block_size)}"
    again = linear_quantize_weights.blockwise_compress_by_dtype(value, op.data.dtype, "LINEAR_SYMMETRIC", blocks)
    if again is None:
        return "cannot be quantized again"
    same = np.array_equal(again.data, data) and np.array_equal(again.scale, scale) and (
        (offset is None and again.offset is None) or (offset is not None and again.offset is not None
                                                      and np.array_equal(again.offset, offset)))
    return None if same else "quantized data or scales differ from the source quantized again"


def _palette(op: Any, value: np.ndarray) -> str | None:
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    again = palettize_weights.blockwise_compress(value, "KMEANS", 4, [0] * value.ndim)
    if again is None:
        return "cannot be palettized again"
    dense = palettize_weights.decompress(again)
    return None if np.array_equal(np.asarray(dense), np.asarray(op.materialized_val_inference())) else \
        "palette or indices differ from the source palettized again"


def readback(artifact: Path, manifest: dict[str, Any], source: WeightSource) -> Readback:
    from targets.coreml.mil_eval import _materialize
    from targets.coreml.pipeline import DECODE
    from targets.coreml.pipeline import load as load_pipeline
    from targets.coreml.runner import load_mil_program

    cfg = MistralConfig(**manifest["model"]["config"])
    precision = manifest["target"]["precision"]
    block_size = int(manifest["target"]["options"].get("block_size", 32))
    ops = {op.name: op for part in load_pipeline(artifact, manifest).parts
           for op in load_mil_program(part.path).functions[DECODE].operations}
    weights: dict[str, torch.Tensor] = {}
    mismatches: list[str] = []
    for name in parameter_shapes(cfg):
        key = mil_name(name, fp16=True)
        # What coremltools compresses: the fp32 source cast to fp16 (its FP16ComputePrecision pass).
        value = source.parameter(name, torch.float32).numpy().astype(np.float16)
        op = ops.get(key + "_quantized") or ops.get(key + "_palettized") or ops.get(key)
        if op is None:
            mismatches.append(f"{name}: not found in the MIL program")
            continue
        if op.op_type == "const":
            stored = np.asarray(op.outputs[0].val)
            problem = None if np.array_equal(stored, value) else "differs from the source weight in fp16"
        else:
            stored = np.asarray(_materialize(op))
            problem = (_linear(op, value, precision, block_size) if op.op_type == "constexpr_blockwise_shift_scale"
                       else _palette(op, value) if op.op_type == "constexpr_lut_to_dense"
                       else f"unexpected op {op.op_type}")
        if problem:
            mismatches.append(f"{name}: {problem}")
        weights[name] = torch.from_numpy(stored.astype(np.float32))
    method = {"int8": "int8 per channel", "int4": f"int4 per block {block_size}", "palette4": "4-bit k-means LUT"}.get(
        precision, precision)
    return Readback(weights, len(weights), mismatches,
                    f"coremltools {method} re-run on the fp16 source, compared exactly (MIL constexpr ops)")
