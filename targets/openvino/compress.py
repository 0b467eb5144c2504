"""Weight-only compression with NNCF (data-free): int8 per channel, int4 per group with an int8 backup."""

from __future__ import annotations

from typing import Any

from exporter.config import MistralConfig
from targets.openvino.options import OpenVinoOptions, compression_mode, group_size


def compress(model: object, cfg: MistralConfig, precision: str, options: OpenVinoOptions) -> dict[str, Any]:
    """Compress model's weights in place for int8/int4; returns what the manifest records."""
    mode = compression_mode(precision, options)
    if mode is None:
        return {}
    import nncf

    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode(mode)}
    record: dict[str, Any] = {"library": "nncf", "mode": mode}
    if precision == "int4":
        group = group_size(cfg, options)
        kwargs.update(group_size=group, ratio=options.ratio, all_layers=options.all_layers)
        # all_layers puts the embedding and lm_head in int4 as well: the lm_head is a fifth of this
        # model's bytes per token. Without it they stay int8 (nncf's backup, optimum-intel's default);
        # the share (1 - ratio) of the other weights is int8 either way.
        record.update(group_size=group, ratio=options.ratio, all_layers=options.all_layers, backup="int8_asym")
    nncf.compress_weights(model, **kwargs)
    return record
