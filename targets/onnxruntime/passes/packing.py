"""Pack sibling linears: MatMuls that read the same activations become one MatMul over their
weights stacked along N (q/k/v, gate/up). A decode step then reads each activation once and
dispatches one kernel instead of three or two, as onnxruntime-genai's builder does for q/k/v.

GQA takes packed q/k/v directly as its query; other packs are split back with one Split.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from targets.onnxruntime.export import WEIGHT_META
from targets.onnxruntime.graph import attr, initializer, node


def _linear_weight(matmul: ir.Node) -> ir.Value | None:
    """W when matmul is MatMul(x, Transpose(W)) over a weight input used nowhere else."""
    t = matmul.inputs[1].producer() if matmul.inputs[1] is not None else None
    if t is None or t.op_type != "Transpose" or tuple(attr(t, "perm", ())) != (1, 0):
        return None
    w = t.inputs[0]
    if w is None or WEIGHT_META not in w.meta or len(w.uses()) != 1 or len(t.outputs[0].uses()) != 1:
        return None
    return w


def _groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """Linear MatMuls grouped by their shared input, groups of two or more, in graph order."""
    by_input: dict[int, list[ir.Node]] = {}
    for n in graph:
        if n.op_type == "MatMul" and n.inputs[0] is not None and _linear_weight(n) is not None:
            by_input.setdefault(id(n.inputs[0]), []).append(n)
    return [g for g in by_input.values() if len(g) > 1]


def _packed_weight(graph: ir.Graph, weights: list[ir.Value], name: str) -> ir.Value:
    rows = sum(int(w.shape[0]) for w in weights)  # type: ignore[index]
    packed = ir.val(name, weights[0].dtype, ir.Shape((rows, int(weights[0].shape[1]))))  # type: ignore[index]
    packed.meta[WEIGHT_META] = tuple(n for w in weights for n in w.meta[WEIGHT_META])
    graph.inputs.append(packed)
    return packed


def _gqa_qkv(outputs: list[ir.Value]) -> ir.Node | None:
    """The GQA node whose query, key and value are exactly these three outputs, in order."""
    uses = [o.uses() for o in outputs]
    if len(outputs) != 3 or any(len(u) != 1 for u in uses):
        return None
    gqa = uses[0][0].node
    ok = gqa.op_type == "GroupQueryAttention" and all(u[0].node is gqa and u[0].idx == i for i, u in enumerate(uses))
    return gqa if ok else None


def pack_linears(model: ir.Model) -> int:
    """Pack every group of sibling linears; returns the number of packed MatMuls made."""
    g = model.graph
    made = 0
    for group in _groups(g):
        weights = [_linear_weight(m) for m in group]
        names = [w.meta[WEIGHT_META][0] for w in weights]  # type: ignore[union-attr]
        prefix = names[0].rsplit(".", 2)[0]
        kind = "qkv_proj" if len(group) == 3 else "_".join(n.rsplit(".", 2)[-2].removesuffix("_proj") for n in names) + "_proj"
        packed = _packed_weight(g, weights, f"{prefix}.{kind}.weight")  # type: ignore[arg-type]
        t = node(g, "Transpose", [packed], perm=[1, 0])
        matmul = node(g, "MatMul", [group[0].inputs[0], t.outputs[0]])
        outputs = [m.outputs[0] for m in group]
        gqa = _gqa_qkv(outputs)
        if gqa is not None:
            gqa.replace_input_with(0, matmul.outputs[0])
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
        else:
            sizes = np.array([int(w.shape[0]) for w in weights], dtype=np.int64)  # type: ignore[union-attr]
            split = node(g, "Split", [matmul.outputs[0], initializer(g, f"{prefix}.{kind}.split", sizes)],
                         outputs=len(group), axis=-1)
            for old, new in zip(outputs, split.outputs):
                new.type, new.shape = old.type, old.shape
                old.replace_all_uses_with(new)
        made += 1
    g.sort()
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for value in [v for v in g.inputs if WEIGHT_META in v.meta and not v.uses()]:
        g.inputs.remove(value)
    return made
