"""Bind the weights: each weight input becomes an initializer whose data is produced lazily, one
tensor at a time, while onnx_ir writes the external data file. Nothing holds two copies of the
model: the peak is about one (possibly concatenated) weight and its converted form.

A weight used as ``MatMul(x, Transpose(W))`` (every nn.Linear) is stored pre-transposed, or, for
int4/int8, as MatMulNBits' blocks (which use the nn.Linear layout [N, K] directly).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from targets.onnxruntime.export import WEIGHT_META, weight_inputs
from targets.onnxruntime.graph import attr
from targets.onnxruntime.quantize import BlockQuantizer, QuantSpec

Lookup = Callable[[str], torch.Tensor]


def stored_name(names: tuple[str, ...], suffix: str) -> str:
    """model.layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.q_proj.<suffix>."""
    return names[0].removesuffix(".weight") + "." + suffix if len(names) == 1 else names[0] + "." + suffix


def loader(names: tuple[str, ...], lookup: Lookup) -> Callable[[], torch.Tensor]:
    """The weight made of names: one parameter, or several stacked along dim 0 (packed MatMuls)."""
    def load() -> torch.Tensor:
        parts = [lookup(n) for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return load


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], make: Callable[[], object]) -> ir.LazyTensor:
    return ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(shape), name=name)  # type: ignore[arg-type]


def _register(graph: ir.Graph, tensor: ir.LazyTensor) -> ir.Value:
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _linear_users(value: ir.Value) -> list[ir.Node] | None:
    """The Transpose([1, 0]) nodes of W when every use of W is MatMul(x, Transpose(W)), else None."""
    transposes = [use.node for use in value.uses()]
    for t in transposes:
        if t.op_type != "Transpose" or tuple(attr(t, "perm", ())) != (1, 0):
            return None
        if any(u.node.op_type != "MatMul" or u.idx != 1 for u in t.outputs[0].uses()):
            return None
    return transposes


def bind_weights(model: ir.Model, lookup: Lookup, quant: QuantSpec | None = None,
                 spec_for: Callable[[tuple[str, ...]], QuantSpec | None] | None = None) -> dict[str, dict]:
    """Turn every weight input into lazily produced initializers, quantizing MatMul weights with
    spec_for(names) when given (None keeps a weight float), else with quant. Returns the weight map the
    manifest records, so the artifact's weights can be read back by canonical name: initializer (or
    MatMulNBits prefix) -> {"names": canonical names stacked along rows, "layout": as-is | transposed |
    matmulnbits, and "quantization" where a weight's spec is not quant}."""
    g = model.graph
    quantizers: dict[QuantSpec, BlockQuantizer] = {}
    weight_map: dict[str, dict] = {}
    for value in weight_inputs(model):
        names: tuple[str, ...] = value.meta[WEIGHT_META]
        load = loader(names, lookup)
        shape = tuple(int(d) for d in value.shape)  # type: ignore[union-attr]
        g.inputs.remove(value)
        transposes = _linear_users(value)
        if transposes is None:  # embedding, norm weights: stored as they are
            value.const_value = _lazy(value.name or names[0], value.dtype, shape,  # type: ignore[arg-type]
                                      lambda load=load: TorchTensor(load().contiguous()))
            g.register_initializer(value)
            weight_map[value.name or names[0]] = {"names": list(names), "layout": "as-is"}
            continue
        name = stored_name(names, "MatMul.weight")
        spec = spec_for(names) if spec_for is not None else quant
        if spec is None:
            w_t = _register(g, _lazy(name, value.dtype, shape[::-1],  # type: ignore[arg-type]
                                     lambda load=load: TorchTensor(load().t().contiguous())))
            for t in transposes:
                t.outputs[0].replace_all_uses_with(w_t)
            weight_map[name] = {"names": list(names), "layout": "transposed"}
        else:
            if spec not in quantizers:
                quantizers[spec] = BlockQuantizer(spec)
            quantizer = quantizers[spec]
            _quantized_matmuls(g, transposes, names, load, shape, quantizer, spec)  # type: ignore[arg-type]
            weight_map[name] = {"names": list(names), "layout": "matmulnbits",
                                **({} if spec == quant else {"quantization": spec.__dict__})}
        g.remove(transposes, safe=True)
    return weight_map


def _quantized_matmuls(g: ir.Graph, transposes: list[ir.Node], names: tuple[str, ...],
                       load: Callable[[], torch.Tensor], shape: tuple[int, ...], quantizer: BlockQuantizer,
                       spec: QuantSpec) -> None:
    n, k = shape
    key = stored_name(names, "MatMul.weight")
    parts = ["B", "scales"] if spec.symmetric else ["B", "scales", "zero_points"]
    dtypes = {"B": ir.DataType.UINT8, "scales": ir.DataType.FLOAT, "zero_points": ir.DataType.UINT8}
    shapes = spec.shapes(n, k)
    stored = [_register(g, _lazy(f"{key}_{p}", dtypes[p], shapes[p],
                                 lambda p=p: ir.tensor(quantizer.part(key, p, load)))) for p in parts]
    attrs = {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size}
    if spec.accuracy_level:
        attrs["accuracy_level"] = spec.accuracy_level
    for t in transposes:
        for use in list(t.outputs[0].uses()):
            matmul = use.node
            # Named after the MatMul it replaces, not by the graph's node counter: a graph loaded
            # from the graph cache has created fewer nodes, and must serialize to the same bytes.
            q = ir.node("MatMulNBits", [matmul.inputs[0], *stored], attributes=attrs, domain="com.microsoft",
                        name=f"{matmul.name}_nbits")
            out, new = matmul.outputs[0], q.outputs[0]
            new.shape, new.type = out.shape, out.type
            matmul.append(q)
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            g.remove(matmul, safe=True)
            new.name = out.name
