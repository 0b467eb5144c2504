"""Weight compression through coremltools.optimize.coreml, applied to each converted function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from targets.coreml.lower import quiet_coremltools

# Expected weight-file size relative to fp16 (weights dominate): int8 1/2, int4 and 4-bit LUT ~1/4.
EXPECTED_RATIO = {"fp16": 1.0, "fp32": 2.0, "int8": 0.5, "int4": 0.25, "palette4": 0.25}


def compressor(precision: str, block_size: int) -> Callable[[Any], Any]:
    """The compression step for a precision (identity for float precisions)."""
    ct = quiet_coremltools()
    opt = ct.optimize.coreml
    if precision == "int8":
        config = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"))
        return lambda model: opt.linear_quantize_weights(model, config)
    if precision == "int4":
        config = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size))
        return lambda model: opt.linear_quantize_weights(model, config)
    if precision == "palette4":
        config = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(nbits=4, mode="kmeans"))
        return lambda model: opt.palettize_weights(model, config)
    return lambda model: model
