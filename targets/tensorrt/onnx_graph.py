"""The TensorRT-flavoured ONNX: the canonical program with each cached_attention node decomposed to a
single-output opset-23 `Attention` (which the TensorRT ONNX parser maps to IAttention since 10.14),
the ring-buffer write as ScatterElements, and the KV caches as explicit inputs and outputs.

It is ONNX Runtime's fallback export (targets/onnxruntime/export.py) without the RMSNorm fusions,
which are ONNX Runtime contrib ops: so the weights stream into the external data file one tensor at
a time, as they do for that target, instead of being bound into the program first.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from targets.base import LowerInput
from targets.onnxruntime.export import quiet, save, to_onnx
from targets.onnxruntime.kernels import ONNX_ATTENTION
from targets.onnxruntime.passes.io import canonical_io
from targets.onnxruntime.passes.reshapes import drop_reshape_roundtrips
from targets.onnxruntime.passes.weights import bind_weights

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def _name_dims(model: ir.Model) -> None:
    """Give the exporter's symbolic dims (s12, s18, ...) the contract's names: batch and chunk."""
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        dims = list(value.shape or ())
        if dims and not isinstance(dims[0], int):
            dims[0] = "batch"
        if value.name in ("input_ids", "positions", "logits") and not isinstance(dims[1], int):
            dims[1] = "chunk"
        value.shape = ir.Shape(dims)


def export_onnx(inp: LowerInput, out_dir: Path) -> Path:
    """Write out_dir/model.onnx (+ model.onnx.data) from the one exported program."""
    cfg = inp.config
    inp.progress("tensorrt: exporting ONNX", 0.0)
    path = out_dir / MODEL_FILE
    with quiet():
        # The traced program itself: to_onnx builds new programs and never mutates it.
        model = to_onnx(inp.traced, cfg, inp.capacity, ONNX_ATTENTION, fuse_norms=False)
        canonical_io(model, cfg.num_hidden_layers)
        drop_reshape_roundtrips(model)
        _name_dims(model)
        bind_weights(model, inp.weight)
        save(model, path, DATA_FILE, inp.progress, "tensorrt")
    return path
