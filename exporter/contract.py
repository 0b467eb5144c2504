"""IO and cache contracts: what a runner or a foreign client needs to drive an artifact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from exporter.config import MistralConfig


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype, named (or fixed) dims and its role."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]
    role: str


@dataclass(frozen=True)
class CacheContract:
    """Fixed-capacity KV cache; with a window it is a ring buffer written at position % capacity."""

    capacity: int
    window: int | None
    layout: str
    dtype: str
    num_layers: int
    kv_heads: int
    head_dim: int
    policy: str = field(init=False)
    residence: str = "explicit-io"

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", "ring" if self.window else "linear")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_contract(cfg: MistralConfig, capacity: int, dtype: str, residence: str = "explicit-io") -> CacheContract:
    return CacheContract(capacity=capacity, window=cfg.sliding_window, layout="BNSH[batch,kv_heads,capacity,head_dim]",
                         dtype=dtype, num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, residence=residence)


def canonical_io(cfg: MistralConfig, dtype: str) -> list[TensorSpec]:
    """The canonical program's inputs and outputs, in order."""
    cache_dims = ("batch", cfg.num_key_value_heads, "capacity", cfg.head_dim)
    specs = [TensorSpec("input_ids", "int64", ("batch", "chunk"), "input_ids"),
             TensorSpec("positions", "int64", ("batch", "chunk"), "positions (-1 = padding)")]
    for kind in ("key", "value"):
        specs += [TensorSpec(f"past_{kind}.{i}", dtype, cache_dims, f"cache_in:{kind}:{i}")
                  for i in range(cfg.num_hidden_layers)]
    specs.append(TensorSpec("logits", "float32", ("batch", "chunk", cfg.vocab_size), "logits"))
    for kind in ("key", "value"):
        specs += [TensorSpec(f"present_{kind}.{i}", dtype, cache_dims, f"cache_out:{kind}:{i}")
                  for i in range(cfg.num_hidden_layers)]
    return specs


def io_to_dict(specs: list[TensorSpec]) -> dict[str, list[dict[str, Any]]]:
    return {"inputs": [asdict(s) for s in specs if not s.role.startswith(("logits", "cache_out"))],
            "outputs": [asdict(s) for s in specs if s.role.startswith(("logits", "cache_out"))]}
