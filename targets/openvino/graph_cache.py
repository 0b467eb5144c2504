"""The OpenVINO lowered-graph cache: the converted model before its weights are bound (targets/lowered_cache.py).

Converting the program (torch re-traces it through decompositions, then OpenVINO's frontend) is most of
an OpenVINO build, and nothing of it depends on the weights, which are still Parameters named
``weight:<canonical name>`` until weights.bind. An entry is ``openvino-graphs/<key>.ir``: the model's
IR, its XML and its .bin of small constants (masks, rotary frequencies) in one payload, and
``<key>.meta.json``. Beyond the shared checks, the loaded model's weight Parameters must be exactly the
program's parameters with their shapes. An IR is XML and raw constants: reading it runs no code.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.trace_cache import UnsafeCache
from targets.lowered_cache import LoweredCache, lowered_spec, pack_files, unpack_files
from targets.openvino.weights import weight_parameters

FORMAT = "mistral-export/openvino-graph-cache"
MAX_IR_BYTES = 256 << 20  # the weight-free IR of a 7B-dims model is well under a megabyte


def graph_spec(program_digest: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the weight-free model depends on: the program, the settings, the versions."""
    import openvino as ov

    return lowered_spec(program_digest, settings, Path(__file__).parent, {"openvino": ov.get_version()})


def _pack(model: Any) -> bytes:
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="mistral-export-ir-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        text, consts = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    return pack_files([text, consts])


def _unpack(data: bytes) -> Any:
    import numpy as np
    import openvino as ov

    text, consts = unpack_files(data, 2)
    consts = np.frombuffer(consts, dtype=np.uint8).copy()
    return ov.Core().read_model(text.decode(), ov.Tensor(consts))


def _check_weights(model: Any, parameters: dict[str, tuple[int, ...]]) -> None:
    """The model's weight Parameters are the program's parameters, each once (a tied lm_head may share
    the embedding's), of their ranks and, where the frontend kept them static, their shapes."""
    found = {name: param.get_output_partial_shape(0) for name, param in weight_parameters(model).items()}
    missing = set(parameters) - set(found)
    tied = missing == {"lm_head.weight"} and parameters["lm_head.weight"] == parameters.get("model.embed_tokens.weight")
    if set(found) - set(parameters) or (missing and not tied):
        raise UnsafeCache("its weight inputs are not the program's parameters")
    for name, shape in found.items():
        dims = [None if d.is_dynamic else d.get_length() for d in shape]
        if len(dims) != len(parameters[name]) or any(d not in (None, n) for d, n in zip(dims, parameters[name])):
            raise UnsafeCache(f"weight input {name!r} has shape {shape}, not {parameters[name]}")


@dataclass(frozen=True)
class GraphCache:
    """The openvino-graphs folder of the cache root."""

    cache: LoweredCache

    @staticmethod
    def open() -> GraphCache | None:
        cache = LoweredCache.open("openvino-graphs", FORMAT, "ir", MAX_IR_BYTES)
        return None if cache is None else GraphCache(cache)

    def load(self, spec: dict[str, Any], parameters: dict[str, tuple[int, ...]]) -> tuple[Any, dict] | None:
        """The cached weight-free model and what the target records about it, or None."""
        def decode(meta: dict[str, Any], data: bytes) -> tuple[Any, dict]:
            model = _unpack(data)
            _check_weights(model, parameters)
            return model, meta["extra"]

        return self.cache.load(spec, decode)

    def store(self, spec: dict[str, Any], model: Any, extra: dict[str, Any]) -> None:
        """Write the entry: call before the weights are bound."""
        self.cache.write(spec, _pack(model), {"extra": extra})
