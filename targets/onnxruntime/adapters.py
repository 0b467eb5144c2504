"""Runtime LoRA adapters: one `.onnx_adapter` file per adapter, in onnxruntime's adapter format, holding
the A and B inputs of every linear it adapts (passes/lora.py). onnxruntime's LoraAdapter and
onnxruntime-genai's Adapters load it; a linear an adapter does not adapt keeps its empty default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.adapter import RUNTIME_DIR, runtime_record


def write_adapters(out_dir: Path, adapters: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Write adapters/<name>.onnx_adapter for each adapter, in its LoRA inputs' dtype; what the manifest
    records about each."""
    import onnxruntime as ort

    (out_dir / RUNTIME_DIR).mkdir()
    records = {}
    for name, adapter in adapters.items():
        params = {}
        for weight, io in inputs.items():
            if weight in adapter.deltas:
                a, b = adapter.factors(weight)  # [r, in], scale * [out, r]
                for key, factor in ((io["A"], a.T), (io["B"], b.T)):
                    array = np.ascontiguousarray(factor.numpy().astype(io["dtype"]))
                    params[key] = ort.OrtValue.ortvalue_from_numpy(array)
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        path = f"{RUNTIME_DIR}/{name}.onnx_adapter"
        fmt.export_adapter(str(out_dir / path))
        records[name] = runtime_record(adapter, path, len(params))
    return records
