"""LoRA inputs: every adapted linear, y = x @ W.T, becomes y = x @ W.T + (x @ A) @ B, where A [in, r] and
B [r, out] are graph inputs that default to empty initializers ([in, 0] and [0, out]: the update is zero).

That is the form onnxruntime's LoRA adapters feed: an `.onnx_adapter` file holds A and B by input name and
RunOptions.add_active_adapter (onnxruntime-genai: Generator.set_active_adapter) overrides the defaults for
one run. Runs before packing: an adapted q/k/v projection is then left unpacked.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from targets.onnxruntime.export import WEIGHT_META
from targets.onnxruntime.graph import attr, node


def input_names(weight: str) -> tuple[str, str]:
    """model.layers.0.self_attn.q_proj.weight -> its A and B input names."""
    module = weight.removesuffix(".weight")
    return f"{module}.lora_A", f"{module}.lora_B"


def _overridable(graph: ir.Graph, name: str, dtype: ir.DataType, dims: tuple[int | str, ...],
                 empty: tuple[int, int]) -> ir.Value:
    """A graph input whose initializer, an empty tensor, is used when no adapter overrides it."""
    value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype),
                     const_value=ir.tensor(np.zeros(empty, dtype=dtype.numpy()), name=name))
    graph.register_initializer(value)
    graph.inputs.append(value)
    return value


def add_lora_inputs(model: ir.Model, weights: set[str]) -> dict[str, dict[str, object]]:
    """Add the LoRA path to the linears of the named weights; returns input names and shapes per weight."""
    g = model.graph
    found: dict[str, dict[str, object]] = {}
    for w in [v for v in g.inputs if WEIGHT_META in v.meta and v.meta[WEIGHT_META][0] in weights]:
        name = w.meta[WEIGHT_META][0]
        for use in list(w.uses()):
            t = use.node
            if t.op_type != "Transpose" or tuple(attr(t, "perm", ())) != (1, 0):
                continue
            for mm_use in list(t.outputs[0].uses()):
                matmul = mm_use.node
                if matmul.op_type != "MatMul" or mm_use.idx != 1:
                    continue
                x, y = matmul.inputs[0], matmul.outputs[0]
                out_dim, in_dim = (int(d) for d in w.shape)  # type: ignore[union-attr]
                a_name, b_name = input_names(name)
                dtype = x.dtype  # type: ignore[union-attr]
                rank = f"lora_rank.{name.removesuffix('.weight')}"
                a = _overridable(g, a_name, dtype, (in_dim, rank), (in_dim, 0))
                b = _overridable(g, b_name, dtype, (rank, out_dim), (0, out_dim))
                users = list(y.uses())
                xa = node(g, "MatMul", [x, a]).outputs[0]
                delta = node(g, "MatMul", [xa, b]).outputs[0]
                total = node(g, "Add", [y, delta]).outputs[0]
                total.shape, total.dtype = y.shape, y.dtype
                for user in users:
                    user.node.replace_input_with(user.idx, total)
                if y.is_graph_output():  # lm_head: the sum takes over the output and its name
                    index, output_name = list(g.outputs).index(y), y.name
                    y.name = f"{output_name}_base"
                    total.name = output_name
                    g.outputs[index] = total
                found[name] = {"A": a_name, "B": b_name, "in": in_dim, "out": out_dim,
                               "dtype": str(dtype.numpy())}
    g.sort()
    missing = sorted(weights - set(found))
    if missing:
        raise RuntimeError(f"no MatMul(x, Transpose(W)) found for {missing[:3]}: the graph pattern changed")
    return found
