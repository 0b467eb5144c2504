"""Drop Reshape round trips: Reshape(Reshape(x)) whose result has x's own shape is x.

The canonical program moves heads between [B, H, T, D] and [B, T, H*D] around the attention op;
once GQA takes and returns [B, T, H*D] those moves cancel and only cost node dispatches.
"""

from __future__ import annotations

import onnx_ir as ir

from targets.onnxruntime.graph import producer


def _known(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) or d.value is not None for d in shape)


def drop_reshape_roundtrips(model: ir.Model) -> int:
    """Bypass every Reshape pair that restores its source's shape; returns how many."""
    dropped = 0
    for node in list(model.graph):
        first = producer(node.inputs[0], "Reshape") if node.op_type == "Reshape" else None
        if first is None:
            continue
        source, result = first.inputs[0], node.outputs[0]
        if source is None or not _known(source.shape) or source.shape != result.shape:
            continue
        if result.is_graph_output():
            continue
        result.replace_all_uses_with(source)
        dropped += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return dropped
