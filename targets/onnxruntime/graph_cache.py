"""The lowered-graph cache: the weight-free ONNX graph after the passes, by the spec it was lowered from.

Translating the program (torch.onnx.export re-traces it through decompositions) and running the
graph passes take most of a build, and none of it depends on the weights. So the graph as it stands
before the weights are bound is kept: ``<key>.onnx`` (its ModelProto: weights are graph inputs, only
the small constants such as RoPE tables are inside) and ``<key>.meta.json`` (its sha256, the spec (the
program's content hash, config, capacity, pass settings and versions), the
canonical names behind each weight input, and what the manifest records about the passes).

The integrity rules are the trace cache's (exporter.trace_cache): a private folder, files owned by
this user and writable by nobody else, the hash and the spec must match, and the loaded graph's weight
inputs must be exactly the program's parameters with their shapes. Anything else is a miss with one
warning; a failed write is one warning and never fails a build. ONNX is protobuf: reading it runs no code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript
import torch

from exporter import __version__
from exporter.trace_cache import UnsafeCache, read_entry, runtime_cache, write_entry
from targets.onnxruntime.export import WEIGHT_META, weight_inputs

FORMAT = "mistral-export/onnx-graph-cache"
MAX_GRAPH_BYTES = 512 << 20  # RoPE tables of 2^17 positions are 64 MB; bounds a hostile read
MAX_SIDECAR_BYTES = 4 << 20
log = logging.getLogger("mistral_export")


def _source_hash() -> str:
    """The graph is a function of the translation and the passes: a change to any of them must miss."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def graph_spec(program_digest: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the lowered graph depends on: the program, the settings of the passes, the versions."""
    return {"program": program_digest, "settings": settings, "tool": __version__, "torch": torch.__version__,
            "onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__, "onnx": onnx.__version__,
            "passes": _source_hash()}


@dataclass(frozen=True)
class GraphCache:
    """The onnx-graphs folder of the cache root."""

    folder: Path

    @staticmethod
    def open() -> GraphCache | None:
        """The cache, or None when caching is off or its folder is not safe (runtime_cache warns)."""
        folder = runtime_cache("onnx-graphs")
        return None if folder is None else GraphCache(folder)

    @staticmethod
    def key(spec: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.onnx", self.folder / f"{key}.meta.json"

    def load(self, spec: dict[str, Any], parameters: dict[str, tuple[int, ...]]) -> tuple[ir.Model, dict] | None:
        """The cached graph (weight inputs tagged as to_onnx tags them) and its manifest fields, or None."""
        graph_path, sidecar = self._paths(self.key(spec))
        if not graph_path.exists() and not sidecar.exists():
            return None
        try:
            meta, data = read_entry(graph_path, sidecar, FORMAT, spec, MAX_GRAPH_BYTES, MAX_SIDECAR_BYTES)
            model = ir.from_proto(onnx.ModelProto.FromString(data))
            _tag_weights(model, meta.get("weights"), parameters)
            return model, meta["extra"]
        except Exception as exc:  # noqa: BLE001 - an entry that cannot be read (a DecodeError too) is a miss
            log.warning("graph cache entry %s %s; lowering afresh", graph_path.name, exc)
            return None

    def store(self, spec: dict[str, Any], model: ir.Model, extra: dict[str, Any]) -> None:
        """Write the entry (graph, then sidecar): call before the weights are bound."""
        graph_path, sidecar = self._paths(self.key(spec))
        try:
            weights = {v.name: list(v.meta[WEIGHT_META]) for v in weight_inputs(model)}
            write_entry(graph_path, sidecar, ir.to_proto(model).SerializeToString(),
                        {"format": FORMAT, "spec": spec, "weights": weights, "extra": extra})
        except (OSError, ValueError) as exc:
            log.warning("could not write the graph cache in %s (%s); continuing without it", self.folder,
                        getattr(exc, "strerror", None) or exc)


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
