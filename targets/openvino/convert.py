"""The exported program -> an OpenVINO model, with weights left out as named Parameters.

Two decompositions of ``mistral_export::cached_attention`` are offered, both exact:

- ``ring``: the canonical one (exporter.attention.decompose): a fixed-capacity ring buffer written by
  scatter, masked from positions. Used for the stateless IR, whose IO is the canonical contract.
- ``concat``: the layout OpenVINO's CPU plugin fuses into its own KV-cache attention: keys are
  ``concat(past, new)`` along the sequence axis and the mask comes from an ``attention_mask`` input
  (1 = real token, 0 = padding) over ``[past; chunk]``. Key k is seen by query q iff k is real,
  k is not after q, and fewer than W real tokens lie in (k, q]: that is ``k > p(q) - W`` in positions,
  so the window is exact whatever the padding, and counts stay relative, so a runner may drop old
  slots without renumbering anything.

Weights become Parameters (``weight:<canonical name>``) so conversion never allocates them; the
caller binds them one at a time afterwards (weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.export import ExportedProgram
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from exporter.attention import CACHED_ATTENTION_OP, MASK_FLOOR, attention_mask, write_cache

WEIGHT_PREFIX = "weight:"


@torch.library.custom_op("mistral_export_ov::slot_mask", mutates_args=())
def slot_mask(keys: Tensor) -> Tensor:
    """Stand-in for the IR's attention_mask input [B, past + T]; replaced by a graph input before conversion."""
    raise RuntimeError("slot_mask is a conversion-time stand-in and never runs")


@slot_mask.register_fake
def _(keys: Tensor) -> Tensor:
    return keys.new_empty((keys.shape[0], keys.shape[2]), dtype=torch.int64)


SLOT_MASK_OP = torch.ops.mistral_export_ov.slot_mask.default


def window_mask(valid: Tensor, positions: Tensor, window: int) -> Tensor:
    """Boolean [B, 1, T, N] from slot validity [B, N] (past then chunk) and chunk positions [B, T]."""
    counts = torch.cumsum(valid, 1)  # [B, N]: real tokens up to and including each slot
    chunk_valid = (positions >= 0).to(torch.int64)
    # Each query's count, built without slicing [past; chunk] so no size is baked into the graph.
    past = valid.sum(1, keepdim=True) - chunk_valid.sum(1, keepdim=True)
    q_counts = (past + torch.cumsum(chunk_valid, 1)).unsqueeze(2)  # [B, T, 1]
    k_counts = counts.unsqueeze(1)  # [B, 1, N]
    seen = torch.logical_and(valid.unsqueeze(1) > 0, k_counts <= q_counts)
    if window > 0:
        seen = torch.logical_and(seen, q_counts - k_counts < window)
    return seen.unsqueeze(1)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D] as Unsqueeze/Broadcast/Reshape, the GQA pattern the
    CPU plugin fuses (the frontend drops SDPA's enable_gqa). -1 keeps S out of the constants."""
    if n_rep == 1:
        return x
    b, h, _, d = x.shape
    return x.unsqueeze(2).expand(-1, -1, n_rep, -1, -1).reshape(b, h * n_rep, -1, d)


def sdpa(q: Tensor, keys: Tensor, values: Tensor, seen: Tensor) -> Tensor:
    """SDPA with an additive mask; the finite floor keeps a fully masked (padding) row finite."""
    n_rep = q.shape[1] // keys.shape[1]
    bias = torch.where(seen, 0.0, MASK_FLOOR).to(q.dtype)
    return F.scaled_dot_product_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), attn_mask=bias)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                   positions: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """The canonical ring buffer (exporter.attention), with GQA spelled out for OpenVINO."""
    seen = attention_mask(positions, k_cache.shape[2], window)
    out = sdpa(q, torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2), seen)
    return out, write_cache(k_cache, k, positions), write_cache(v_cache, v, positions)


def concat_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     positions: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """cached_attention over a growing cache: k_cache [B, Hkv, S, D] -> present [B, Hkv, S + T, D]."""
    keys = torch.cat([k_cache, k], dim=2)
    values = torch.cat([v_cache, v], dim=2)
    return sdpa(q, keys, values, window_mask(SLOT_MASK_OP(keys), positions, window)), keys, values


DECOMPOSITIONS = {"ring": ring_attention, "concat": concat_attention}


@dataclass
class Converted:
    """An OpenVINO model whose trailing Parameters are weights, named ``weight:<name>``."""

    model: object  # openvino.Model
    weights: dict[str, tuple[tuple[int, ...], torch.dtype]]


def _decomposition_table(layout: str) -> object:
    """OpenVINO's own table (what convert_model(ExportedProgram) would run) plus our attention."""
    from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
    from torch.export.decomp_utils import CustomDecompTable

    table = CustomDecompTable()
    for op in ops_to_not_decompose():
        table.pop(op, None)
    table[CACHED_ATTENTION_OP] = DECOMPOSITIONS[layout]
    return table


def _placeholder_after(graph: torch.fx.Graph, after: torch.fx.Node, name: str, like: Tensor) -> torch.fx.Node:
    with graph.inserting_after(after):
        node = graph.placeholder(name)
    node.meta["val"] = like
    node.meta["tensor_meta"] = _extract_tensor_metadata(like)
    return node


def to_graph_module(program: ExportedProgram, layout: str) -> tuple[torch.fx.GraphModule, list[str], dict]:
    """Decompose, unlift, then turn the slot-mask stand-in and every weight into graph inputs.

    Returns the module, the OpenVINO name of each of its inputs in order, and the weights' shapes."""
    weight_names = set(program.state_dict)
    gm = program.run_decompositions(_decomposition_table(layout)).module()
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders]
    last = placeholders[-1]
    stand_ins = [n for n in graph.nodes if n.op == "call_function" and n.target == SLOT_MASK_OP]
    if stand_ins:
        last = _placeholder_after(graph, last, "attention_mask", torch.empty(2, 3, dtype=torch.int64, device="meta"))
        names.append("attention_mask")
        for node in stand_ins:
            node.replace_all_uses_with(last)
            graph.erase_node(node)
    weights: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in weight_names:
            continue
        value = gm.get_parameter(node.target)
        like = torch.empty(value.shape, dtype=value.dtype, device="meta")
        last = _placeholder_after(graph, last, f"weight_{len(weights)}", like)
        names.append(WEIGHT_PREFIX + node.target)
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        weights[node.target] = (tuple(value.shape), value.dtype)
    graph.lint()
    gm.recompile()
    return gm, names, weights


def convert(program: ExportedProgram, layout: str) -> Converted:
    """Convert with openvino's PyTorch frontend; inputs keep the FX order, weights come last."""
    import openvino as ov
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    gm, names, weights = to_graph_module(program, layout)
    model = ov.convert_model(TorchFXPythonDecoder(gm, dynamic_shapes=True))
    if len(model.inputs) != len(names):
        raise AssertionError(f"converted model has {len(model.inputs)} inputs, the graph {len(names)}")
    for port, name in zip(model.inputs, names):
        port.get_tensor().set_names({name})
    return Converted(model, weights)
