"""The ONNX Runtime lowered-graph cache: the weight-free ONNX graph after the passes (targets/lowered_cache.py).

An entry is ``onnx-graphs/<key>.onnx`` (its ModelProto: weights are graph inputs, only the small
constants such as RoPE tables are inside) and ``<key>.meta.json`` (the spec, the canonical names behind
each weight input, and what the manifest records about the passes). Beyond the shared checks, the loaded
graph's weight inputs must be exactly the program's parameters with their shapes. ONNX is protobuf:
reading it runs no code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript

from exporter.trace_cache import UnsafeCache
from targets.lowered_cache import LoweredCache, lowered_spec
from targets.onnxruntime.export import WEIGHT_META, weight_inputs

FORMAT = "mistral-export/onnx-graph-cache"
MAX_GRAPH_BYTES = 512 << 20  # RoPE tables of 2^17 positions are 64 MB; bounds a hostile read
log = logging.getLogger("mistral_export")


def graph_spec(program_digest: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the lowered graph depends on: the program, the settings of the passes, the versions."""
    return lowered_spec(program_digest, settings, Path(__file__).parent,
                        {"onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__, "onnx": onnx.__version__})


@dataclass(frozen=True)
class GraphCache:
    """The onnx-graphs folder of the cache root."""

    cache: LoweredCache

    @staticmethod
    def open() -> GraphCache | None:
        """The cache, or None when caching is off or its folder is not safe (runtime_cache warns)."""
        cache = LoweredCache.open("onnx-graphs", FORMAT, "onnx", MAX_GRAPH_BYTES)
        return None if cache is None else GraphCache(cache)

    def load(self, spec: dict[str, Any], parameters: dict[str, tuple[int, ...]]) -> tuple[ir.Model, dict] | None:
        """The cached graph (weight inputs tagged as to_onnx tags them) and its manifest fields, or None."""
        def decode(meta: dict[str, Any], data: bytes) -> tuple[ir.Model, dict]:
            model = ir.from_proto(onnx.ModelProto.FromString(data))
            _tag_weights(model, meta.get("weights"), parameters)
            return model, meta["extra"]

        return self.cache.load(spec, decode)

    def store(self, spec: dict[str, Any], model: ir.Model, extra: dict[str, Any]) -> None:
        """Write the entry (graph, then sidecar): call before the weights are bound."""
        weights = {v.name: list(v.meta[WEIGHT_META]) for v in weight_inputs(model)}
        try:
            data = ir.to_proto(model).SerializeToString()
        except ValueError as exc:  # protobuf's 2 GB limit: build on without the cache
            log.warning("could not serialize the lowered graph for the cache (%s); continuing without it", exc)
            return
        self.cache.write(spec, data, {"weights": weights, "extra": extra})


def _tag_weights(model: ir.Model, weights: Any, parameters: dict[str, tuple[int, ...]]) -> None:
    """Tag the weight inputs with their canonical names, checking that they are exactly the program's
    parameters, each once, with the shapes they have stacked along rows."""
    if not isinstance(weights, dict):
        raise UnsafeCache("records no weight inputs")
    inputs = {v.name: v for v in model.graph.inputs}
    seen: list[str] = []
    for name, names in weights.items():
        value = inputs.get(name)
        if value is None or not isinstance(names, list) or not names or not all(n in parameters for n in names):
            raise UnsafeCache(f"names weight input {name!r} that the graph or the program does not have")
        shapes = [parameters[n] for n in names]
        rows = sum(s[0] for s in shapes)
        expected = shapes[0] if len(shapes) == 1 else (rows, *shapes[0][1:])
        if len({s[1:] for s in shapes}) != 1 or tuple(value.shape or ()) != tuple(expected):
            raise UnsafeCache(f"weight input {name!r} has shape {value.shape}, not {expected}")
        value.meta[WEIGHT_META] = tuple(names)
        seen += names
    if sorted(seen) != sorted(parameters):
        raise UnsafeCache("its weight inputs are not the program's parameters, each once")
