"""Refuse, before allocating, what this machine cannot hold: a KV cache is sized by the artifact's
capacity, which a config or --max-context may make far larger than memory."""

from __future__ import annotations

import psutil

from exporter.config import MistralConfig
from exporter.errors import NotMeasurable

# Share of the memory available now that the caches may take; the weights and activations need the rest.
CACHE_SHARE = 0.5


def cache_bytes(cfg: MistralConfig, capacity: int, batch: int, itemsize: int = 4) -> int:
    """K and V for every layer: 2 x layers x batch x kv_heads x capacity x head_dim elements."""
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * capacity * cfg.head_dim * itemsize


def check_caches_fit(cfg: MistralConfig, capacity: int, batch: int, copies: int, what: str) -> None:
    """NotMeasurable (exit 2 from the CLI; a not-run validation inside a build) when `copies` fp32 caches
    of this batch would take more than CACHE_SHARE of the memory available."""
    need = copies * cache_bytes(cfg, capacity, batch)
    available = psutil.virtual_memory().available
    if need > CACHE_SHARE * available:
        raise NotMeasurable(f"{what} needs {need / 2**30:.1f} GiB of KV cache (capacity {capacity}, batch {batch}, "
                            f"{copies} runner(s)), more than this machine can spare ({available / 2**30:.1f} GiB "
                            "available); use a machine with more memory or rebuild with a smaller --max-context")
