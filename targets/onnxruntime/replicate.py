"""A model's decoder layers from two translated ones.

torch.onnx's cost grows with the layer count (it re-traces the program to decompose it, then
translates node by node), yet every decoder layer translates to the same nodes but for its weights and
its cache input and output. So a program of the model's first two layers is translated, and the second
layer's nodes are copied for layers 2..N-1, each copy fed by the one before. The first layer stays as
translated: the exporter creates constants there that later layers share, and the value that flows
from one layer into the next can only be seen between two layers.

Runs on torch.onnx's output after the optimizer and before the fusions (export.to_onnx): its nodes
still carry their module scopes, the weights are graph inputs under their canonical names, and the IO
is still torch.onnx's (input_ids, positions, k caches, v caches; logits, k out, v out).
"""

from __future__ import annotations

import re

import onnx_ir as ir

TEMPLATE_LAYERS = 2  # the layers a template program holds
SCOPES = "pkg.torch.onnx.name_scopes"
FX_NODE = "pkg.torch.onnx.fx_node"  # the FX node a node came from: layer 1's, so not carried to copies
_LAYER = re.compile(r"'model\.layers\.(\d+)'")
_TEMPLATE = re.compile(r"(model[._]layers[._])1(?!\d)")  # layer 1 in scope names and parameter names


class ReplicationError(RuntimeError):
    """The translated template is not two layers chained as expected; raised before the graph is changed."""


def layer_of(node: ir.Node) -> int | None:
    """The decoder layer a node was translated from, by its module scope; None outside the layers."""
    found = _LAYER.search(node.metadata_props.get(SCOPES, ""))
    return int(found.group(1)) if found else None


def _renamed(text: str, layer: int) -> str:
    return _TEMPLATE.sub(lambda m: f"{m.group(1)}{layer}", text)


def _chain(graph: ir.Graph, first: set[ir.Node], template: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
    """The hidden state entering the template layer (from layer 0) and the one leaving it. Anything
    else crossing the layer's border must be the same for every layer (constants, shapes, positions,
    the rotary tables) or its cache output; a graph where it is not is refused, not copied wrong."""
    inside = set(template)
    outputs = set(graph.outputs)

    def made_by(value: ir.Value, nodes: set[ir.Node]) -> bool:
        node = value.producer()
        return node in nodes and node.op_type != "Constant"

    def activation(value: ir.Value) -> bool:  # [batch, tokens, ...] floats: not a shape or an index
        return value.shape is not None and len(value.shape) >= 3 and value.dtype is not None \
            and value.dtype.is_floating_point()

    entering = {v for n in template for v in n.inputs if v is not None and made_by(v, first) and activation(v)}
    leaving = {v for n in template for v in n.outputs
               if v not in outputs and made_by(v, inside) and any(use.node not in inside for use in v.uses())}
    if len(entering) != 1 or len(leaving) != 1:
        raise ReplicationError(f"expected one activation into and one value out of layer 1, found "
                               f"{len(entering)} and {len(leaving)}")
    return entering.pop(), leaving.pop()


def replicate(graph: ir.Graph, layers: int, weights: list[ir.Value]) -> dict[ir.Value, ir.Value]:
    """Extend a graph translated from the first TEMPLATE_LAYERS layers to `layers` layers, in place.
    `weights` are its weight inputs (graph inputs after the data inputs); each added layer's weights are
    inserted after the layer before's. Returns each added weight input with the template's it copies."""
    nodes = list(graph)
    template = [n for n in nodes if layer_of(n) == 1]
    first = {n for n in nodes if layer_of(n) == 0}
    if not template or not first or any(layer_of(n) not in (None, 0, 1) for n in nodes):
        raise ReplicationError("the translated program is not a two-layer template")
    data = [v for v in graph.inputs if v not in set(weights)]
    if len(data) != 2 + 2 * TEMPLATE_LAYERS or len(graph.outputs) != 1 + 2 * TEMPLATE_LAYERS:
        raise ReplicationError(f"expected 6 data inputs and 5 outputs, found {len(data)} and {len(graph.outputs)}")
    h_in, h_out = _chain(graph, first, template)
    k_in, v_in = data[3], data[5]  # input_ids, positions, k0, k1, v0, v1
    k_out, v_out = graph.outputs[2], graph.outputs[4]  # logits, k0, k1, v0, v1
    if k_out.producer() not in template or v_out.producer() not in template \
            or any(u.node not in template for v in (k_out, v_out) for u in v.uses()):
        raise ReplicationError("layer 1's cache outputs are not its own")
    own = [v for v in weights if _TEMPLATE.search(v.name or "")]
    if not own:
        raise ReplicationError("layer 1 has no weight inputs")
    nested = next((n for n in template if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                              for a in n.attributes.values())), None)
    if nested is not None:
        raise ReplicationError(f"{nested.op_type} node {nested.name} in layer 1 has a subgraph")
    tail = [use for use in h_out.uses() if use.node not in set(template)]  # the final norm reads layer N-1
    anchor, previous, added = template[-1], h_out, {}
    last_k, last_v, last_weight = k_in, v_in, own[-1]
    for layer in range(TEMPLATE_LAYERS, layers):
        mapping: dict[ir.Value, ir.Value] = {h_in: previous}
        for old in (k_in, v_in):
            mapping[old] = ir.Value(name=re.sub(r"\d+$", str(layer), old.name or ""), type=old.type,
                                    shape=old.shape.copy() if old.shape is not None else None)
        graph.inputs.insert(graph.inputs.index(last_k) + 1, mapping[k_in])
        graph.inputs.insert(graph.inputs.index(last_v) + 1, mapping[v_in])
        last_k, last_v = mapping[k_in], mapping[v_in]
        at = graph.inputs.index(last_weight) + 1
        for offset, old in enumerate(own):
            new = ir.Value(name=_renamed(old.name or "", layer), type=old.type,
                           shape=old.shape.copy() if old.shape is not None else None)
            graph.inputs.insert(at + offset, new)
            mapping[old], added[new], last_weight = new, old, new
        for node in template:
            copy = _copy(node, mapping, layer)
            graph.insert_after(anchor, copy)
            anchor = copy
        graph.outputs.insert(1 + layer, mapping[k_out])
        graph.outputs.append(mapping[v_out])
        previous = mapping[h_out]
    for use in tail:
        use.node.replace_input_with(use.idx, previous)
    graph.sort()
    return added


def _copy(node: ir.Node, mapping: dict[ir.Value, ir.Value], layer: int) -> ir.Node:
    """node for `layer`: inputs through mapping (values from outside the layer are shared), outputs
    added to it, names suffixed with the layer."""
    metadata = {k: _renamed(v, layer) for k, v in node.metadata_props.items() if k != FX_NODE}
    copy = ir.Node(node.domain, node.op_type, [None if v is None else mapping.get(v, v) for v in node.inputs],
                   list(node.attributes.values()), overload=node.overload, num_outputs=len(node.outputs),
                   version=node.version, name=f"{node.name}__layer{layer}", metadata_props=metadata)
    for old, new in zip(node.outputs, copy.outputs):
        new.name = f"{old.name}__layer{layer}"
        new.shape = old.shape.copy() if old.shape is not None else None
        new.type = old.type
        new.const_value = old.const_value
        mapping[old] = new
    return copy
