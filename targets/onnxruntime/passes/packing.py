"""Pack q/k/v: the three projections GroupQueryAttention reads become one MatMul over their
weights stacked along N, fed to GQA as its packed query (key and value omitted), as
onnxruntime-genai's builder does. A step then reads the normed activations once and dispatches one
kernel instead of three. (Packing gate/up too was measured neutral for decode and costs a Split
copy and a larger prefill transient, so it is not done.)
"""

from __future__ import annotations

import onnx_ir as ir

from targets.onnxruntime.export import WEIGHT_META
from targets.onnxruntime.graph import attr, gqa_nodes, node


def _linear_weight(value: ir.Value | None) -> tuple[ir.Node, ir.Value] | None:
    """(matmul, W) when value = MatMul(x, Transpose(W)) over a weight input used nowhere else."""
    matmul = value.producer() if value is not None else None
    if matmul is None or matmul.op_type != "MatMul" or len(value.uses()) != 1:  # type: ignore[union-attr]
        return None
    t = matmul.inputs[1].producer() if matmul.inputs[1] is not None else None
    if t is None or t.op_type != "Transpose" or tuple(attr(t, "perm", ())) != (1, 0):
        return None
    w = t.inputs[0]
    if w is None or WEIGHT_META not in w.meta or len(w.uses()) != 1 or len(t.outputs[0].uses()) != 1:
        return None
    return matmul, w


def pack_qkv(model: ir.Model) -> int:
    """Give every GQA node whose q, k and v are linears of one input a packed query; returns how many."""
    g = model.graph
    packed_count = 0
    for gqa in gqa_nodes(g):
        found = [_linear_weight(v) for v in gqa.inputs[:3]]
        if any(f is None for f in found) or len({id(f[0].inputs[0]) for f in found}) != 1:  # type: ignore[index]
            continue
        weights = [f[1] for f in found]  # type: ignore[index]
        names = tuple(n for w in weights for n in w.meta[WEIGHT_META])
        rows = sum(int(w.shape[0]) for w in weights)  # type: ignore[index]
        stacked = ir.val(names[0].rsplit(".", 2)[0] + ".qkv_proj.weight", weights[0].dtype,
                         ir.Shape((rows, int(weights[0].shape[1]))))  # type: ignore[index]
        stacked.meta[WEIGHT_META] = names
        g.inputs.append(stacked)
        t = node(g, "Transpose", [stacked], perm=[1, 0])
        matmul = node(g, "MatMul", [found[0][0].inputs[0], t.outputs[0]])  # type: ignore[index]
        gqa.replace_input_with(0, matmul.outputs[0])
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        packed_count += 1
    g.sort()
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for value in [v for v in g.inputs if WEIGHT_META in v.meta and not v.uses()]:
        g.inputs.remove(value)
    return packed_count
