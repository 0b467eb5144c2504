"""Fold the program's RoPE into GroupQueryAttention (do_rotary=1, cos/sin tables).

The canonical graph rotates q and k in the rotate-half layout from cos/sin of the positions, then
GQA receives them. This pass matches, for each GQA node, the rotation feeding its query and key,
feeds GQA the unrotated projections instead, and lets GQA rotate at each valid token's position
(P + s, which equals the token's position for right-padded chunks). The tables hold
cos/sin(p * inv_freq) for p < rows, at the fp32 angles the canonical model uses; the runner
refuses positions past the table (build with fuse_rotary=false for unbounded positions).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from exporter.config import MistralConfig
from exporter.model import rope_angles
from targets.onnxruntime.graph import attr, constant, gqa_nodes, initializer, producer
from targets.onnxruntime.translate import COS_CACHE, SIN_CACHE

BHTD_TO_BTHD = (0, 2, 1, 3)


def _is_transpose(node: ir.Node | None) -> bool:
    return node is not None and tuple(attr(node, "perm", ())) == BHTD_TO_BTHD


def _span(node: ir.Node) -> tuple[int, int, int] | None:
    """(start, end, axis) of a one-axis Slice with constant bounds."""
    parts = [constant(v) for v in node.inputs[1:4]]
    if any(p is None or p.size != 1 for p in parts):
        return None
    return tuple(int(p.ravel()[0]) for p in parts)  # type: ignore[union-attr, return-value]


def _rotate_half_source(cat: ir.Node | None, half: int) -> ir.Value | None:
    """x when cat = Concat(-x[..., half:], x[..., :half]) on the last axis, else None."""
    if cat is None or len(cat.inputs) != 2:
        return None
    neg, low = producer(cat.inputs[0], "Neg"), producer(cat.inputs[1], "Slice")
    high = producer(neg.inputs[0], "Slice") if neg is not None else None
    if high is None or low is None or high.inputs[0] is not low.inputs[0]:
        return None
    hs, ls = _span(high), _span(low)
    if hs is None or ls is None or hs[0] != half or ls[:2] != (0, half) or {hs[2], ls[2]} - {-1, 3}:
        return None
    return low.inputs[0]


def _table(value: ir.Value | None, op_type: str) -> bool:
    """value is Cos/Sin(angles), possibly cast to the activation dtype."""
    cast = producer(value, "Cast")
    return producer(cast.inputs[0] if cast is not None else value, op_type) is not None


def _unrotated(value: ir.Value | None, half: int) -> ir.Value | None:
    """The [B, T, H*D] projection before RoPE, for GQA's query or key input, or None.

    Matches Reshape(Transpose(x * cos + rotate_half(x) * sin)) with x = Transpose(Reshape(proj))."""
    reshape = producer(value, "Reshape")
    transpose = producer(reshape.inputs[0], "Transpose") if reshape is not None else None
    add = producer(transpose.inputs[0], "Add") if _is_transpose(transpose) else None
    muls = [producer(v, "Mul") for v in add.inputs] if add is not None else []
    x_cos = x_sin = None
    for mul in muls:
        for data, factor in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])) if mul else ():
            if _table(factor, "Cos"):
                x_cos = data
            elif _table(factor, "Sin"):
                x_sin = _rotate_half_source(producer(data, "Concat"), half)
    if x_cos is None or x_cos is not x_sin:
        return None
    pre = producer(x_cos, "Transpose")
    view = producer(pre.inputs[0], "Reshape") if _is_transpose(pre) else None
    return view.inputs[0] if view is not None else None  # type: ignore[union-attr]


def cos_sin_tables(cfg: MistralConfig, rows: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[rows, D/2] tables at the canonical model's own fp32 angles, their cos/sin taken in float64 and
    rounded once. torch's threaded fp32 cos gave one build in a few a different table (the second
    thread's rows off by up to 1.5e-4, which validation failed); numpy's float64 is the same in every
    process and within one ulp of a correct fp32 cos."""
    angles = rope_angles(torch.arange(rows).unsqueeze(0), cfg.head_dim, cfg.rope_theta)[0].double().numpy()
    return tuple(torch.from_numpy(f(angles)).float().to(dtype).numpy() for f in (np.cos, np.sin))  # type: ignore[return-value]


def fuse_rotary(model: ir.Model, cfg: MistralConfig, rows: int, dtype: torch.dtype) -> int:
    """Move RoPE into every GQA node whose query and key match; returns how many were fused."""
    g = model.graph
    cos, sin = cos_sin_tables(cfg, rows, dtype)
    cos_v, sin_v = initializer(g, "cos_cache", cos), initializer(g, "sin_cache", sin)
    fused = 0
    for gqa in gqa_nodes(g):
        q, k = (_unrotated(gqa.inputs[i], cfg.head_dim // 2) for i in (0, 1))
        if q is None or k is None:
            continue
        gqa.replace_input_with(0, q)
        gqa.replace_input_with(1, k)
        gqa.replace_input_with(COS_CACHE, cos_v)
        gqa.replace_input_with(SIN_CACHE, sin_v)
        gqa.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        fused += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return fused
