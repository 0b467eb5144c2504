"""The exported program as an ONNX IR model, with its weights detached.

torch.onnx translates the program once; the weights (zero-stride placeholders in the traced
program) are turned into graph inputs right away, so the optimizer can neither fold them nor merge
placeholders that happen to be equal, and so no weight is read before passes/weights.py streams
it into external data. The optimizer is onnxscript's, the RMSNorm fusions are onnxscript's ORT
fusions.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization
from torch.export import ExportedProgram

from exporter.attention import CACHED_ATTENTION_OP, decompose
from exporter.config import MistralConfig
from targets.onnxruntime.replicate import replicate
from targets.onnxruntime.translate import gqa_translation

STACK_TRACE = "pkg.torch.onnx.stack_trace"

OPSET = 23  # the lowest opset with the standard Attention op (the fallback); ORT 1.32 loads 23-28
WEIGHT_META = "mistral_export.weight"  # Value.meta key: the canonical weight names a value is made of


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.onnx prints its steps and warns about optional packages; keep the build's output clean."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def to_onnx(program: ExportedProgram, cfg: MistralConfig, capacity: int, attention: str,
            fuse_norms: bool = True) -> ir.Model:
    """Translate the program: cached_attention onto GQA ("gqa"), or decomposed into the standard
    Attention op and scatters ("onnx-attention"). Weights become graph inputs tagged WEIGHT_META.
    fuse_norms folds RMSNorm into ONNX Runtime's (Skip)SimplifiedLayerNormalization, which other
    consumers of the ONNX (TensorRT's parser) do not take. Call it inside quiet(): the libraries log
    every step. A program of fewer layers than cfg is a template (replicate.py): its second layer is
    copied up to cfg's layer count."""
    weights = list(program.state_dict)
    table = {}
    if attention == "gqa":
        table = {CACHED_ATTENTION_OP: gqa_translation(cfg, capacity)}
    else:
        program = decompose(program)
    onnx_program = torch.onnx.export(program, (), dynamo=True, custom_translation_table=table,
                                     optimize=False, opset_version=OPSET, verbose=False)
    model = onnx_program.model
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.resize_outputs(3)  # onnxscript creates the optional output_qk; GQA rejects it unasked
    for name in weights:
        value = model.graph.initializers.pop(name)
        value.const_value = None
        value.meta[WEIGHT_META] = (name,)
        model.graph.inputs.append(value)
    onnxscript.optimizer.optimize(model)
    if (len(model.graph.inputs) - len(weights) - 2) // 2 < cfg.num_hidden_layers:  # ids, positions, k/v caches
        # After the optimizer (it costs as much per layer as the translation): copies of an optimized
        # layer are what optimizing the copies would give, as nothing in a layer depends on its index.
        for new in replicate(model.graph, cfg.num_hidden_layers, weight_inputs(model)):
            new.meta[WEIGHT_META] = (new.name,)
    if fuse_norms:
        fuse_rms_normalization(model)
        fuse_skip_rms_normalization(model)
        onnxscript.optimizer.optimize(model)
    # The exporter records each node's Python stack trace, absolute source paths included: dropped, so
    # the same inputs give the same bytes wherever the tool is installed (and no local path ships).
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop(STACK_TRACE, None)
    return model


def save(model: ir.Model, path: Path, data_file: str, progress: Callable[[str, float], None], label: str) -> None:
    """Write the model with its lazily bound weights streamed into data_file, one tensor at a time."""
    model.producer_name = "mistral-export"
    total = len(model.graph.initializers)
    done = iter(range(1, total + 1))

    def written(tensor: ir.TensorProtocol, _: object) -> None:
        progress(f"{label}: writing {tensor.name}", next(done) / total)

    ir.save(model, path, external_data=data_file, callback=written)


def weight_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if WEIGHT_META in v.meta]
