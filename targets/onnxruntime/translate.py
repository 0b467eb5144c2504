"""The cached_attention node as ONNX Runtime's GroupQueryAttention.

GQA (com.microsoft) with ``sliding_window_cache=1`` keeps a window-sized cache and evicts on its
own, so the canonical ring semantics (query p sees key k iff k <= p and k > p - W) hold exactly for
any chunk, batch row and padding: rows are right-padded and ``query_seqlens`` counts each row's
valid tokens, ``seqlens_k`` is each row's token count after the step minus one. GQA's cache is
not a ring (it keeps the most recent positions contiguous from row 0), so the artifact's cache
layout is GQA's own and only its runner writes it; see runner.py.

Without a sliding window the cache holds the whole context C, and window C is the same attention
within it (the runner refuses tokens beyond C, as generate does), so one GQA form serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from onnx import TensorProto
from onnxscript import opset18 as op

from exporter.config import MistralConfig
from targets.onnxruntime.schemas import ort_op

# GQA inputs that the graph passes rewire, by index in the op's schema.
SEQLENS_K, TOTAL_LENGTH, COS_CACHE, SIN_CACHE, QUERY_SEQLENS = 5, 6, 7, 8, 16


def _shape(*dims: Any) -> ir.Shape:
    return ir.Shape(dims)


def gqa_translation(cfg: MistralConfig, capacity: int) -> Callable[..., Any]:
    """A torch.onnx custom translation of mistral_export::cached_attention onto GQA."""
    gqa = ort_op("GroupQueryAttention")
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def cached_attention(q: Any, k: Any, v: Any, k_in: Any, v_in: Any, positions: Any,
                         window: int) -> tuple[Any, Any, Any]:
        flat = op.Constant(value_ints=[0, 0, -1])
        row = op.Constant(value_ints=[1])

        def to_bsh(x: Any) -> Any:  # [B, H, T, D] -> [B, T, H*D]
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

        valid = op.Cast(op.GreaterOrEqual(positions, op.Constant(value_int=0)), to=TensorProto.INT32)
        query_seqlens = op.ReduceSum(valid, row, keepdims=0)
        # Provisional lengths from positions (right for rows holding a token); passes/io.py replaces
        # them with lengths from attention_mask, which also covers a row that is all padding.
        seqlens_k = op.Cast(op.ReduceMax(positions, row, keepdims=0), to=TensorProto.INT32)
        total = op.Add(op.ReduceMax(seqlens_k, keepdims=0), op.Constant(value_int=1))
        none = [None] * (QUERY_SEQLENS - TOTAL_LENGTH - 1)
        out, k_cache, v_cache, *_ = gqa(to_bsh(q), to_bsh(k), to_bsh(v), k_in, v_in, seqlens_k, total,
                                        *none, query_seqlens, num_heads=hq, kv_num_heads=hkv,
                                        local_window_size=window or capacity, sliding_window_cache=1)
        # Contrib ops have no ONNX shape inference: state GQA's output shapes for the graph passes.
        out.shape, out.dtype = _shape(q.shape[0], q.shape[2], hq * d), q.dtype
        for new, old in ((k_cache, k_in), (v_cache, v_in)):
            new.shape, new.dtype = old.shape, old.dtype
        out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, hq, d])), perm=[0, 2, 1, 3])
        return out, k_cache, v_cache

    return cached_attention
