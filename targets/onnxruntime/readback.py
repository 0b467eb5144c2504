"""Read an ONNX Runtime artifact's weights back: MatMulNBits blocks dequantized as the kernel defines
them, float initializers as stored, each compared with the source weight encoded again by
onnxruntime's own block quantizer (DefaultWeightOnlyQuantizer) under the recorded settings.

The manifest's weight map says which canonical weights each initializer holds (packed q/k/v stack
three along rows). A map that lies cannot hide a defect: every stored tensor must equal the
re-encoding of the weights it claims, and validation binds exactly those values by those names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from exporter.checkpoint import WeightSource
from exporter.errors import ArtifactError
from targets.base import Readback
from targets.onnxruntime.target import DATA_FILE, MODEL_FILE


def _initializers(artifact: Path) -> dict[str, np.ndarray]:
    """Every initializer by name, external data read (memory-mapped) from the artifact's own data file."""
    proto = onnx.load(str(artifact / MODEL_FILE), load_external_data=False)
    data = np.memmap(artifact / DATA_FILE, dtype=np.uint8, mode="r") if (artifact / DATA_FILE).is_file() else None
    found = {}
    for t in proto.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
            if info.get("location") != DATA_FILE or data is None or offset + length > data.size:
                raise ArtifactError(f"{MODEL_FILE}: initializer {t.name} points outside {DATA_FILE}; rebuild the artifact")
            found[t.name] = np.frombuffer(data[offset:offset + length], dtype=dtype).reshape(tuple(t.dims))
        else:
            found[t.name] = onnx.numpy_helper.to_array(t)
    return found


def _matmulnbits(proto: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """MatMulNBits attributes and inputs by the prefix of their B initializer."""
    nodes = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nodes[node.input[1].removesuffix("_B")] = {**attrs, "inputs": list(node.input)}
    return nodes


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, n: int,
               k: int, block: int) -> np.ndarray:
    """MatMulNBits' definition: per block along K, (q - zero_point) * scale; zero point 2^(bits-1)
    when absent; 4-bit values and zero points two per byte, low nibble first. Returns [N, K] fp32."""
    blocks = -(-k // block)
    raw = packed.reshape(n, blocks, -1)
    q = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(n, blocks, -1) if bits == 4 else raw
    if zero_points is None:
        zp = np.full((n, blocks), 2 ** (bits - 1), dtype=np.float32)
    elif bits == 4:
        zp = np.stack([zero_points & 0xF, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zp = zero_points.reshape(n, blocks).astype(np.float32)
    values = (q.astype(np.float32) - zp[:, :, None]) * scales.reshape(n, blocks)[:, :, None]
    return values.reshape(n, -1)[:, :k]


def _requantize(weight: np.ndarray, quant: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """onnxruntime's own encoding of a [N, K] weight, through the build's quantizer."""
    from targets.onnxruntime.quantize import BlockQuantizer, QuantSpec

    spec = QuantSpec(bits=quant["bits"], block_size=quant["block_size"], symmetric=quant["symmetric"],
                     accuracy_level=quant["accuracy_level"])
    return BlockQuantizer(spec).encode(torch.from_numpy(weight))


def readback(artifact: Path, manifest: dict[str, Any], source: WeightSource) -> Readback:
    target = manifest["target"]
    weight_map, quant = target.get("weight_map"), target.get("quantization")
    if not weight_map:
        return Readback({}, 0, [], "none", unchecked="the manifest has no weight map (built by an older version)")
    stored = _initializers(artifact)
    nbits = _matmulnbits(onnx.load(str(artifact / MODEL_FILE), load_external_data=False))
    weights: dict[str, torch.Tensor] = {}
    mismatches: list[str] = []
    for key, entry in weight_map.items():
        names = entry["names"]
        sources = [source.parameter(n, torch.float32) for n in names]
        expected = torch.cat(sources).numpy()  # [N, K]
        if entry["layout"] == "matmulnbits":
            node = nbits.get(key)
            if node is None or quant is None:
                mismatches.append(f"{key}: no MatMulNBits node reads it")
                continue
            parts = [stored.get(name) for name in node["inputs"][1:4]]
            values = dequantize(parts[0], parts[1], parts[2] if len(node["inputs"]) > 3 else None,
                                node["bits"], node["N"], node["K"], node["block_size"])
            spec = entry.get("quantization", quant)  # a weight quantized unlike the rest (lm_head_bits)
            again = _requantize(expected, spec)
            same = (node["bits"], node["block_size"]) == (spec["bits"], spec["block_size"]) and all(
                a is not None and np.array_equal(a.reshape(-1), b.reshape(-1))
                for a, b in zip(parts, again if not spec["symmetric"] else again[:2]))
            if not same:
                mismatches.append(f"{key}: its MatMulNBits blocks differ from {', '.join(names)} quantized again")
        else:
            value = stored.get(key)
            if value is None:
                mismatches.append(f"{key}: missing")
                continue
            values = value.T if entry["layout"] == "transposed" else value
            if not np.array_equal(values, expected.astype(values.dtype)):
                mismatches.append(f"{key}: differs from {', '.join(names)}")
        rows = np.cumsum([0] + [part.shape[0] for part in sources])
        for name, a, b in zip(names, rows[:-1], rows[1:]):
            weights[name] = torch.from_numpy(np.array(values[a:b], dtype=np.float32))
    method = (f"MatMulNBits int{quant['bits']} block {quant['block_size']} re-encoded by onnxruntime's "
              "DefaultWeightOnlyQuantizer, compared byte for byte" if quant else "float initializers compared exactly")
    return Readback(weights, len(weight_map), mismatches, method)
