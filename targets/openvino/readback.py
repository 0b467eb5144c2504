"""Read an OpenVINO artifact's weights back: each weight's decompression subgraph (Constant ->
Convert -> [Subtract zero point] -> Multiply scale -> ...) evaluated by OpenVINO itself, in f32, and
its constants compared byte for byte with the source weight compressed again by NNCF's per-tensor
lowering under the recorded settings (the streamed path; targets/openvino/compress.py).

Weights are found by name: every weight's output tensor carries its canonical name, and the
compressed constants are named `<name>`, `<name>/scale` and `<name>/zero_point`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import WeightSource
from exporter.config import MistralConfig
from exporter.model import parameter_shapes
from targets.base import Readback
from targets.openvino import compress
from targets.openvino.options import OpenVinoOptions


def _constants(node: Any) -> dict[str, Any]:
    """Every Constant upstream of node, by friendly name."""
    found, stack = {}, [node]
    while stack:
        current = stack.pop()
        if current.get_type_name() == "Constant":
            found[current.get_friendly_name()] = current
        stack += [i.get_source_output().get_node() for i in current.inputs()]
    return found


def _raw(const: Any) -> tuple[tuple[int, ...], str, bytes]:
    return tuple(const.get_output_shape(0)), str(const.get_element_type()), np.array(const.get_data()).tobytes()


def readback(artifact: Path, manifest: dict[str, Any], source: WeightSource) -> Readback:
    import openvino as ov
    from openvino import opset13

    target = manifest["target"]
    cfg = MistralConfig(**manifest["model"]["config"])
    known = {f for f in OpenVinoOptions.__dataclass_fields__}
    options = OpenVinoOptions(**{k: v for k, v in target["options"].items() if k in known})
    configs = compress.tensor_configs(cfg, target["precision"], options)
    model = ov.Core().read_model(artifact / target.get("model_file", "openvino_model.xml"))
    by_name = {n: out for op in model.get_ops() for out in op.outputs() for n in out.get_names()}
    # NNCF's whole-model pass (int4 ratio < 1) keeps friendly names only: `<name>/fq_weights_1/convert`
    # ends a compressed weight, a float Constant named `<name>` is one kept float.
    ops = model.get_ops()
    for op in ops:
        friendly = op.get_friendly_name()
        if friendly.endswith("/convert") and "/fq_weights" in friendly:
            by_name.setdefault(friendly.split("/fq_weights")[0], op.output(0))
    for op in ops:
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real():
            by_name.setdefault(op.get_friendly_name(), op.output(0))
    core = ov.Core()
    weights: dict[str, torch.Tensor] = {}
    mismatches: list[str] = []
    checked = 0
    for name in parameter_shapes(cfg):
        out = by_name.get(name)
        if out is None:
            mismatches.append(f"{name}: not found in the IR")
            continue
        sub = ov.Model([opset13.result(out)], [], "weight")
        value = core.compile_model(sub, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({})[0]
        weights[name] = torch.from_numpy(np.array(value, dtype=np.float32))
        config = configs(name) if configs else None
        if configs is None:
            continue
        checked += 1
        stored = {k: _raw(c) for k, c in _constants(out.get_node()).items() if k.startswith(name)}
        if config is None:
            expected = source.parameter(name, torch.float32).numpy()
            if not np.array_equal(value, expected):
                mismatches.append(f"{name}: differs from the source weight")
            continue
        again = compress.compressed(source.rows(name), config, name, out.get_element_type())
        want = {k: _raw(c) for k, c in _constants(again.get_node()).items() if k.startswith(name)}
        if stored != want:
            which = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
            mismatches.append(f"{name}: {', '.join(which)} differ from the source compressed again")
    if configs is None:
        reason = ("int4 with ratio < 1 is compressed by NNCF's whole-model pass, which cannot be re-run per weight"
                  if target["precision"] == "int4" else "a float artifact")
        return Readback(weights, 0, mismatches, "OpenVINO decompression evaluated", unchecked=reason)
    return Readback(weights, checked, mismatches, f"NNCF {compress.compression_mode(target['precision'], options)} "
                    "re-run per weight (compress_weight), constants compared byte for byte")
