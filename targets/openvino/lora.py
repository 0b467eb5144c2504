"""LoRA for OpenVINO IRs.

- Every linear's MatMul is named `<module>/MatMul` (model.layers.0.self_attn.q_proj/MatMul): OpenVINO
  GenAI's AdapterConfig finds the layer a PEFT tensor adapts by that name, so any PEFT adapter applies
  to our IR in LLMPipeline(..., adapters=...).
- A switchable adapter is written as adapters/<name>.safetensors in PEFT's key layout with its scale
  folded into B, so OpenVINO GenAI applies it with alpha 1 (it reads no adapter_config.json).
- Our runner applies such a file itself: x @ W.T + (x @ A.T) @ B.T beside each adapted MatMul.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.adapter import PREFIX, RUNTIME_DIR, runtime_record
from exporter.errors import ArtifactError
from targets.openvino.convert import WEIGHT_PREFIX

MATMUL = "/MatMul"
_PASS_THROUGH = {"Convert", "Transpose", "Reshape", "Multiply", "Subtract"}  # weight decompression, layout


def _weight_name(node: Any) -> str | None:
    """The canonical weight a MatMul's second input is made from (walking back through decompression)."""
    current = node.input_value(1).get_node()
    while True:
        if current.get_type_name() == "Parameter":
            names = [n for n in current.output(0).get_names() if n.startswith(WEIGHT_PREFIX)]
            return names[0].removeprefix(WEIGHT_PREFIX) if names else None
        if current.get_type_name() not in _PASS_THROUGH or current.get_input_size() == 0:
            return None
        current = current.input_value(0).get_node()


def name_linears(model: Any) -> int:
    """Name each linear's MatMul after its module (before the weights are bound); returns how many."""
    named = 0
    for op in model.get_ops():
        if op.get_type_name() == "MatMul":
            weight = _weight_name(op)
            if weight is not None and weight.endswith(".weight"):
                op.set_friendly_name(weight.removesuffix(".weight") + MATMUL)
                named += 1
    return named


def write_adapters(out_dir: Path, adapters: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """adapters/<name>.safetensors per adapter (PEFT keys, scale folded into B); what the manifest records."""
    from safetensors.numpy import save_file

    (out_dir / RUNTIME_DIR).mkdir()
    records = {}
    for name, adapter in adapters.items():
        tensors = {}
        for weight in sorted(adapter.deltas):
            a, b = adapter.factors(weight)
            module = PREFIX + weight.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = a.numpy().astype(np.float32)
            tensors[f"{module}.lora_B.weight"] = b.numpy().astype(np.float32)
        path = f"{RUNTIME_DIR}/{name}.safetensors"
        save_file(tensors, str(out_dir / path))
        records[name] = runtime_record(adapter, path, len(tensors), alpha=1.0)
    return records


def apply_adapter(model: Any, path: Path) -> int:
    """Add an adapter file's low-rank path beside each MatMul it names; returns how many it adapted."""
    from openvino import opset13 as ops
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    by_name = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "MatMul"}
    modules = {k.removeprefix(PREFIX).removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    missing = sorted(m for m in modules if m + MATMUL not in by_name)
    if missing or len(tensors) != 2 * len(modules):
        raise ArtifactError(f"{path.name} does not fit this IR (no MatMul for {missing[:1]} or a lone factor)")
    for module in modules:
        matmul = by_name[module + MATMUL]
        a = ops.constant(tensors[f"{PREFIX}{module}.lora_A.weight"])
        b = ops.constant(tensors[f"{PREFIX}{module}.lora_B.weight"])
        x = matmul.input_value(0)
        delta = ops.matmul(ops.matmul(x, a, False, True), b, False, True)
        targets = list(matmul.output(0).get_target_inputs())
        total = ops.add(matmul.output(0), delta)
        for target in targets:
            target.replace_source_output(total.output(0))
    model.validate_nodes_and_infer_types()
    return len(modules)
