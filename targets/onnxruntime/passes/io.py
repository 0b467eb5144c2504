"""Graph IO: onnxruntime-genai's names and sequence-length inputs (GQA), or the canonical names.

GQA form: input_ids, attention_mask [batch, total_sequence_length] (1 for every token a row holds,
past and current), position_ids (-1 for padding), past_key_values.{i}.key/value; outputs logits and
present.{i}.key/value. GQA's per-row lengths come from attention_mask, as onnxruntime-genai feeds
them: seqlens_k = sum(mask) - 1, total_sequence_length = mask width.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from targets.onnxruntime.export import WEIGHT_META
from targets.onnxruntime.graph import gqa_nodes, initializer, node, rename
from targets.onnxruntime.translate import SEQLENS_K, TOTAL_LENGTH

BATCH, SEQ, TOTAL, PAST = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"


def _split(model: ir.Model, layers: int) -> tuple[ir.Value, ir.Value, list[ir.Value], list[ir.Value]]:
    data = [v for v in model.graph.inputs if WEIGHT_META not in v.meta]
    ids, positions, caches = data[0], data[1], data[2:]
    assert len(caches) == 2 * layers, f"expected {2 * layers} cache inputs, got {len(caches)}"
    return ids, positions, caches[:layers], caches[layers:]


def genai_io(model: ir.Model, layers: int, kv_heads: int, head_dim: int, vocab: int) -> None:
    """Rename IO to onnxruntime-genai's names and feed GQA's lengths from attention_mask."""
    g = model.graph
    ids, positions, k_in, v_in = _split(model, layers)
    rename(ids, "input_ids", (BATCH, SEQ))
    rename(positions, "position_ids", (BATCH, SEQ))
    cache = (BATCH, kv_heads, PAST, head_dim)
    for i, (k, v) in enumerate(zip(k_in, v_in)):
        rename(k, f"past_key_values.{i}.key", cache)
        rename(v, f"past_key_values.{i}.value", cache)
    logits, k_out, v_out = g.outputs[0], g.outputs[1:1 + layers], g.outputs[1 + layers:]
    rename(logits, "logits", (BATCH, SEQ, vocab))
    for i, (k, v) in enumerate(zip(k_out, v_out)):
        rename(k, f"present.{i}.key", cache)
        rename(v, f"present.{i}.value", cache)

    mask = ir.val("attention_mask", ir.DataType.INT64, ir.Shape((BATCH, TOTAL)))
    g.inputs.insert(1, mask)
    held = node(g, "ReduceSum", [mask, initializer(g, "mask_axis", np.array([1], np.int64))], keepdims=0)
    last = node(g, "Sub", [held.outputs[0], initializer(g, "one_i64", np.array(1, np.int64))])
    seqlens_k = node(g, "Cast", [last.outputs[0]], to=ir.DataType.INT32)
    width = node(g, "Shape", [mask], start=1, end=2)
    width_scalar = node(g, "Squeeze", [width.outputs[0]])
    total = node(g, "Cast", [width_scalar.outputs[0]], to=ir.DataType.INT32)
    for gqa in gqa_nodes(g):
        gqa.replace_input_with(SEQLENS_K, seqlens_k.outputs[0])
        gqa.replace_input_with(TOTAL_LENGTH, total.outputs[0])
        for out in gqa.outputs[1:3]:
            out.shape = ir.Shape(cache)
    g.sort()


def canonical_io(model: ir.Model, layers: int) -> None:
    """The canonical names of exporter/contract.py (the decomposed form keeps the canonical IO)."""
    g = model.graph
    ids, positions, k_in, v_in = _split(model, layers)
    rename(ids, "input_ids")
    rename(positions, "positions")
    for i, (k, v) in enumerate(zip(k_in, v_in)):
        rename(k, f"past_key.{i}")
        rename(v, f"past_value.{i}")
    rename(g.outputs[0], "logits")
    for i in range(layers):
        rename(g.outputs[1 + i], f"present_key.{i}")
        rename(g.outputs[1 + layers + i], f"present_value.{i}")
