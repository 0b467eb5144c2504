"""Small onnx_ir helpers shared by the graph passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node producing value, if it is an op_type node of the default or ORT domain."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data (initializer or folded constant), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def attr(node: ir.Node, name: str, default: object = None) -> object:
    a = node.attributes.get(name)
    return default if a is None else a.value


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small constant registered as an initializer."""
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def node(graph: ir.Graph, op_type: str, inputs: list[ir.Value | None], domain: str = "",
         outputs: int = 1, **attributes: object) -> ir.Node:
    """Append a node to the graph (call graph.sort() once a pass is done)."""
    n = ir.node(op_type, inputs, attributes=attributes, domain=domain, num_outputs=outputs)
    graph.append(n)
    return n


def gqa_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "GroupQueryAttention"]


def rename(value: ir.Value, name: str, dims: tuple[str | int, ...] | None = None) -> None:
    value.name = name
    if dims is not None:
        value.shape = ir.Shape(dims)
