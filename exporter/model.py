"""The canonical Mistral model: a pure function with explicit KV caches.

forward(input_ids[B,T], positions[B,T], k_caches[L x [B,Hkv,C,D]], v_caches[...])
    -> (logits[B,T,V], k_caches', v_caches')

References: Mistral 7B (arXiv 2310.06825) for the rolling buffer, RoFormer (arXiv 2104.09864) for
RoPE in the rotate-half layout that Hugging Face checkpoints use, RMSNorm (arXiv 1910.07467).
Parameter names equal Hugging Face's, so checkpoints bind by name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporter.attention import cached_attention
from exporter.config import MistralConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """fp32 angles [B, T, D/2] for absolute positions (padding -1 is clamped; its output is unused)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                                / head_dim))
    return positions.clamp(min=0).float().unsqueeze(-1) * inv_freq


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, D] for absolute positions."""
    angles = rope_angles(positions, head_dim, theta)  # [B, T, D/2]
    emb = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """GQA projections around the cached_attention op."""

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, d).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, k_cache, v_cache = cached_attention(q, k, v, k_cache, v_cache, positions,
                                                 self.cfg.sliding_window or 0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), k_cache, v_cache


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), positions, cos, sin, k_cache, v_cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


def _embedding(cfg: MistralConfig) -> nn.Embedding:
    # Uninitialized: weights are always bound after construction, and Embedding's normal_ init on the
    # meta device imports torch._dynamo (about 2.4 s of every build that only needs shapes).
    return nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))


class Backbone(nn.Module):
    """Embedding, layers and final norm; named `model` in the parent so keys match HF."""

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.embed_tokens = _embedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MistralModel(nn.Module):
    """Canonical causal LM with explicit, functionally updated KV caches."""

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor, k_caches: list[Tensor],
                v_caches: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        x, new_k, new_v = run_layers(self.model.layers, self.cfg, x, positions, k_caches, v_caches)
        return self.lm_head(self.model.norm(x)).float(), new_k, new_v


def run_layers(layers: Iterable[nn.Module], cfg: MistralConfig, x: Tensor, positions: Tensor,
               k_caches: list[Tensor], v_caches: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The decoder layers over hidden states x [B, T, H], each with its own cache pair."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(layers, k_caches, v_caches):
        x, k_cache, v_cache = layer(x, positions, cos, sin, k_cache, v_cache)
        new_k.append(k_cache)
        new_v.append(v_cache)
    return x, new_k, new_v


class MistralPart(nn.Module):
    """Layers [start, end) of the canonical model, for targets that convert a model in parts: the first
    part also embeds input_ids, the last also applies the final norm and lm_head; the others map hidden
    states to hidden states. Parameter names equal the whole model's, so the same checkpoint binds."""

    def __init__(self, cfg: MistralConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.num_hidden_layers:
            raise ValueError(f"layers [{start}, {end}) are not a part of a {cfg.num_hidden_layers}-layer model")
        self.cfg, self.start, self.end = cfg, start, end
        self.model = nn.Module()
        if start == 0:
            self.model.embed_tokens = _embedding(cfg)
        # A ModuleDict keyed by the global index keeps the names `model.layers.<i>.`.
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(start, end)})
        if end == cfg.num_hidden_layers:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.cfg.num_hidden_layers

    def forward(self, x: Tensor, positions: Tensor, k_caches: list[Tensor],
                v_caches: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """x: input_ids [B, T] in the first part, else hidden states [B, T, H]; returns logits (last part)
        or hidden states, and the part's own updated caches."""
        if self.first:
            x = self.model.embed_tokens(x)
        x, new_k, new_v = run_layers(self.model.layers.values(), self.cfg, x, positions, k_caches, v_caches)
        if self.last:
            return self.lm_head(self.model.norm(x)).float(), new_k, new_v
        return x, new_k, new_v


def empty_caches(cfg: MistralConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> tuple[list[Tensor], list[Tensor]]:
    """Zeroed K and V caches, one [B, Hkv, C, D] tensor per layer each."""
    shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)])


def parameter_shapes(cfg: MistralConfig, layers: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter name (a tied lm_head included) with its shape, of the whole model or of the part
    holding layers [start, end), from a meta-device instance."""
    with torch.device("meta"):
        model = MistralModel(cfg) if layers is None else MistralPart(cfg, *layers)
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
