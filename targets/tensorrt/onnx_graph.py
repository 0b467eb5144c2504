"""The TensorRT-flavoured ONNX: the canonical program with each cached_attention node decomposed to a
single-output opset-23 `Attention` (which the TensorRT ONNX parser maps to IAttention since 10.14),
the ring-buffer write as ScatterElements, and the KV caches as explicit inputs and outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch

from exporter.attention import decompose
from exporter.trace import bind
from targets.base import LowerInput

OPSET = 23
MODEL_FILE = "model.onnx"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "positions"] + [f"past_key.{i}" for i in range(layers)] + \
        [f"past_value.{i}" for i in range(layers)]
    outputs = ["logits"] + [f"present_key.{i}" for i in range(layers)] + [f"present_value.{i}" for i in range(layers)]
    return inputs, outputs


def _name_dims(path: Path) -> None:
    """Give the exporter's symbolic dims (s12, s18, ...) the contract's names: batch and chunk."""
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
        if value.name in ("input_ids", "positions", "logits") and dims[1].dim_param:
            dims[1].dim_param = "chunk"
    onnx.save(model, str(path))


def export_onnx(inp: LowerInput, out_dir: Path) -> Path:
    """Write out_dir/model.onnx (+ model.onnx.data) from the one exported program."""
    program = inp.program()
    bind(program, inp.weight)
    inp.progress("tensorrt: exporting ONNX", 0.3)
    names_in, names_out = io_names(inp.config.num_hidden_layers)
    path = out_dir / MODEL_FILE
    # The exporter logs that optional torchvision ops are absent; they are not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.onnx.export(decompose(program), (), f=str(path), opset_version=OPSET, dynamo=True,
                      input_names=names_in, output_names=names_out, external_data=True, optimize=True,
                      verify=False, verbose=False)
    _name_dims(path)
    return path


def attention_nodes(path: Path) -> list[onnx.NodeProto]:
    model = onnx.load(str(path), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "Attention"]
