"""Weight compression through coremltools.optimize.coreml's own graph passes, applied to each converted
function's MIL program before the functions are merged into one package (targets/coreml/lower.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from targets.coreml.lower import quiet_coremltools

# Expected weight-file size relative to fp16 (weights dominate): int8 1/2, int4 and 4-bit LUT ~1/4.
EXPECTED_RATIO = {"fp16": 1.0, "fp32": 2.0, "int8": 0.5, "int4": 0.25, "palette4": 0.25}


def compressor(precision: str, block_size: int) -> Callable[[Any], None]:
    """The compression step for a precision, in place on a MIL program (nothing for float precisions).

    These are the passes that `linear_quantize_weights` and `palettize_weights` run on an MLModel; run on
    the program itself they skip that API's round trip through a saved model and back."""
    ct = quiet_coremltools()
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption

    opt = ct.optimize.coreml
    if precision == "int8":
        name, op_config = "compression::linear_quantize_weights", opt.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif precision == "int4":
        name, op_config = "compression::linear_quantize_weights", opt.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size)
    elif precision == "palette4":
        name, op_config = "compression::palettize_weights", opt.OpPalettizerConfig(nbits=4, mode="kmeans")
    else:
        return lambda program: None
    config = opt.OptimizationConfig(global_config=op_config)

    def compress(program: Any) -> None:
        # The torch frontend makes every op carry a torch stack-trace scope; the ops these passes add have
        # none (on an MLModel they run on a program loaded from a saved model, which asks for none).
        for function in program.functions.values():
            function._essential_scope_sources = []
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", False)])
        graph_pass.apply(program)

    return compress
