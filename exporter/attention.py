"""Cached attention: the one function each target substitutes with its own kernel.

It is registered as the custom op ``mistral_export::cached_attention`` so that the exported program
keeps one node per layer. A target either maps that node onto its backend's kernel (ORT
GroupQueryAttention, ONNX Attention) or decomposes it with ``decompose`` into plain aten ops
(SDPA + scatter) that its converter understands.

Cache semantics (the rolling buffer of the Mistral 7B paper): the cache has C slots; the token at
position p is written to slot ``p % C``. A row's chunk starts at position p0 = the number of tokens
already in its cache, so slot s holds position ``p0 - 1 - ((p0 - 1 - s) mod C)`` (valid when >= 0).

Worked example, C = W = 3, a row whose chunk is positions [5, 6]:
    p0 = 5; slots 0, 1, 2 hold positions 3, 4, 2.
    query 5 sees cache 3, 4 and chunk 5 (not 2: 2 <= 5 - 3); query 6 sees cache 4, chunk 5, 6.
    afterwards slots 2, 0 are overwritten with positions 5, 6.
Padding tokens have position -1: they see nothing useful, are seen by nobody and write nowhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_FLOOR = -30000.0  # exp(-30000) is 0 in every float dtype; -30000 is finite in fp16 and bf16
_NO_POS = 1 << 30  # larger than any real position, and int32-safe for backends without int64


def slot_positions(positions: Tensor, capacity: int) -> Tensor:
    """Absolute position held by each cache slot before this chunk is written; -1 where empty.

    positions: [B, T] (-1 = padding) -> [B, C]
    """
    valid = positions >= 0
    p0 = torch.where(valid, positions, torch.full_like(positions, _NO_POS)).amin(dim=1, keepdim=True)
    slots = torch.arange(capacity, device=positions.device, dtype=positions.dtype).unsqueeze(0)
    held = p0 - 1 - torch.remainder(p0 - 1 - slots, capacity)
    return torch.where(held >= 0, held, torch.full_like(held, -1))


def attention_mask(positions: Tensor, capacity: int, window: int) -> Tensor:
    """Boolean mask [B, 1, T, C + T] over [cache; chunk]; key k is seen by query p iff
    k valid, k <= p and (no window or k > p - window)."""
    keys = torch.cat([slot_positions(positions, capacity), positions], dim=1)  # [B, C + T]
    q = positions.unsqueeze(2)  # [B, T, 1]
    k = keys.unsqueeze(1)  # [B, 1, C + T]
    seen = torch.logical_and(k >= 0, k <= q)
    if window > 0:
        seen = torch.logical_and(seen, k > q - window)
    return seen.unsqueeze(1)


def write_cache(cache: Tensor, new: Tensor, positions: Tensor) -> Tensor:
    """Write the chunk's K or V into its ring slots. cache: [B, H, C, D], new: [B, H, T, D].

    Padding goes to an extra scratch slot that is dropped, so the op stays a pure scatter.
    """
    b, h, c, d = cache.shape
    t = new.shape[2]
    slot = torch.where(positions >= 0, torch.remainder(positions, c), torch.full_like(positions, c))
    index = slot.view(b, 1, t, 1).expand(b, h, t, d)
    padded = torch.cat([cache, cache[:, :, :1]], dim=2)  # [B, H, C + 1, D]
    return padded.scatter(2, index, new)[:, :, :c]


def reference_cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                               positions: Tensor, window: int,
                               expand_gqa: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; caches: [B, Hkv, C, D] -> out [B, Hq, T, D], caches'.

    expand_gqa repeats KV heads before SDPA, for converters whose SDPA needs equal head counts."""
    capacity = k_cache.shape[2]
    keys = torch.cat([k_cache, k], dim=2)  # [B, Hkv, C + T, D]
    values = torch.cat([v_cache, v], dim=2)
    seen = attention_mask(positions, capacity, window)
    # Additive mask with a finite floor that fp16 can hold: a fully masked (padding) row stays finite,
    # so padding never turns into NaN that a 0 attention weight would still spread (0 * NaN = NaN).
    bias = torch.where(seen, 0.0, MASK_FLOOR).to(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    if expand_gqa and n_rep > 1:
        keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=n_rep > 1 and not expand_gqa)
    return out, write_cache(k_cache, k, positions), write_cache(v_cache, v, positions)


@torch.library.custom_op("mistral_export::cached_attention", mutates_args=())
def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     positions: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    return reference_cached_attention(q, k, v, k_cache, v_cache, positions, window)


@cached_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
      positions: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


CACHED_ATTENTION_OP = torch.ops.mistral_export.cached_attention.default


def decompose(program: torch.export.ExportedProgram, expand_gqa: bool = False) -> torch.export.ExportedProgram:
    """Replace each cached_attention node with aten ops (SDPA + scatter) for generic converters."""

    def impl(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
             window: int) -> tuple[Tensor, Tensor, Tensor]:
        return reference_cached_attention(q, k, v, k_cache, v_cache, positions, window, expand_gqa)

    # Only our op is decomposed: SDPA stays one node, which converters map onto their own SDPA.
    return program.run_decompositions({CACHED_ATTENTION_OP: impl})
