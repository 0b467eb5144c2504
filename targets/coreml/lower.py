"""Lower the canonical program to stateful, multifunction Core ML mlpackages, one per part.

Core ML state is a model buffer updated in place, while the canonical program takes its caches as
inputs and returns them. A thin wrapper module therefore holds one fp16 buffer per layer and K/V,
calls the (decomposed) program's own graph module and copies the new caches back; torch.export of that
wrapper is what coremltools converts. The wrapper re-traces only the exported graph and adds no math
besides the fp16 casts that Core ML's state type requires.

One part (the default for models that convert in the memory at hand) converts the traced program
itself. With several (`chunks`), each part's program is traced from the canonical model's own layers
(exporter.model.MistralPart: same code, same parameter names), bound, converted and freed before the
next, so only one part's weights are ever in memory (targets/coreml/pipeline.py).
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from exporter.attention import decompose
from exporter.config import MistralConfig
from exporter.model import parameter_shapes
from exporter.trace import TraceSpec, traced
from targets.base import LowerInput
from targets.coreml import fp16_pass
from targets.coreml.pipeline import DECODE, HIDDEN_OUT, describe, part_file, plan_parts, prefill_lengths, prefill_name, state_name
from targets.coreml.weights import bind_mil, share_consts


class _CoremltoolsBelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or f"{os.sep}coremltools{os.sep}" not in record.pathname


def quiet_coremltools() -> Any:
    """Import coremltools without its start-up chatter about untested torch and missing macOS libs,
    and without its per-pass progress bars (our own progress bar reports the conversion)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    # Some of its modules log on the root logger (e.g. "Invalid block_sizes" for every 1-D norm weight
    # that int4 per-block leaves in fp16, as intended): the same level applies to those.
    root = logging.getLogger()
    if not any(isinstance(f, _CoremltoolsBelowError) for f in root.filters):
        root.addFilter(_CoremltoolsBelowError())
    # Its constant folding casts the -inf of masks and the range bounds of repeat ops through fp16 and
    # numpy warns per op; weight overflow is checked on our side (weights.dense), not by these warnings.
    warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning, r"coremltools\.")
    import coremltools

    _silence_bars()
    return coremltools


# coremltools' modules that bind tqdm at import: TQDM_DISABLE is read when tqdm itself is first imported,
# which torch or transformers have usually done already, so each module's name is rebound instead.
_BARS = {"coremltools.converters.mil.mil.passes.pass_pipeline": "tqdm",
         "coremltools.converters.mil.frontend.torch.ops": "_tqdm",
         "coremltools.optimize.coreml._post_training_quantization": "tqdm",
         "coremltools.optimize.coreml._quantization_passes": "tqdm"}


def _silence_bars() -> None:
    from tqdm import tqdm

    for module, attr in _BARS.items():
        try:
            loaded = importlib.import_module(module)
        except ImportError:  # a coremltools release that moved it: its bars show, nothing breaks
            continue
        if hasattr(loaded, attr):
            setattr(loaded, attr, functools.partial(tqdm, disable=True))


class StatefulWrapper(nn.Module):
    """Holds a part's KV caches as fp16 buffers (Core ML states) around its canonical graph, which maps
    input_ids (the first part) or hidden states to logits (the last part) or hidden states."""

    def __init__(self, graph: nn.Module, cfg: MistralConfig, capacity: int, dtype: torch.dtype,
                 layers: range) -> None:
        super().__init__()
        self.canonical = graph
        self.dtype = dtype
        self.layers = layers
        shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        for i in layers:
            self.register_buffer(state_name("k", i), torch.zeros(shape, dtype=torch.float16))
            self.register_buffer(state_name("v", i), torch.zeros(shape, dtype=torch.float16))

    def run(self, x: Tensor, positions: Tensor) -> Tensor:
        ks = [getattr(self, state_name("k", i)).to(self.dtype) for i in self.layers]
        vs = [getattr(self, state_name("v", i)).to(self.dtype) for i in self.layers]
        out, new_k, new_v = self.canonical(x, positions, ks, vs)
        for i, k, v in zip(self.layers, new_k, new_v):
            getattr(self, state_name("k", i)).copy_(k.half())
            getattr(self, state_name("v", i)).copy_(v.half())
        return out


class IdsWrapper(StatefulWrapper):
    # torch.export names the Core ML inputs after forward's arguments.
    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.run(input_ids, positions)


class HiddenWrapper(StatefulWrapper):
    def forward(self, hidden: Tensor, positions: Tensor) -> Tensor:
        return self.run(hidden, positions)


def _pipeline(ct: Any, fp16: bool) -> Any:
    """coremltools' main pipeline, run on the weight-free program (binding comes after it)."""
    pipeline = ct.PassPipeline.DEFAULT
    # canonicalize_inplace_pattern only reorders state writes, and it trips over the multi-state
    # update pattern in coremltools 9.0 (a KeyError on a removed op); the program is the same without it.
    # const_deduplication would merge equal placeholders (targets/coreml/weights.py); the backend
    # pipeline runs it on the bound weights.
    pipeline.remove_passes({"common::canonicalize_inplace_pattern", "common::const_deduplication"})
    if fp16:
        fp16_pass.use_in(pipeline)  # the same pass with a memory-bounded overflow check
    return pipeline


def _function(wrapper: StatefulWrapper, example: Tensor, output: str, inp: LowerInput, names: list[str],
              shared: dict[str, Any], compress: Any) -> Any:
    """One function as a finished MIL program: the weight-free wrapper converted, its weights bound
    (arrays shared with the part's other functions), compressed, and through coremltools' backend passes."""
    ct = quiet_coremltools()
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager

    chunk = example.shape[1]
    program = torch.export.export(wrapper, (example, torch.arange(chunk).unsqueeze(0))).run_decompositions({})
    fp16 = inp.precision != "fp32"
    mil = ct.convert(program, convert_to="milinternal",
                     minimum_deployment_target=getattr(ct.target, inp.options.deployment_target),
                     compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                     outputs=[ct.TensorType(name=output)], pass_pipeline=_pipeline(ct, fp16))
    del program
    bind_mil(mil, names, inp.weight_rows, fp16, shared)
    gc.collect()  # the placeholders bind_mil removed are in reference cycles: free them before the next function
    compress(mil)
    PassPipelineManager.apply_pipeline(mil, ct.PassPipeline.get_pipeline("backend_mlprogram"))
    return mil


def _save_multifunction(ct: Any, functions: dict[str, Any], target: str, dest: Path) -> None:
    """Write the functions as one multifunction mlpackage, their shared consts (share_consts) stored once.

    This is what coremltools' save_multifunction does after it has loaded each function back from a saved
    package: here the functions are still in memory and already share their weights."""
    from coremltools.converters.mil.mil import Program

    merged = Program()
    for name, mil in functions.items():
        merged.add_function(name, mil.functions["main"])
    merged.default_function_name = DECODE
    merged.skip_all_passes = True  # each function went through the pipelines on its own
    merged.export_as_multifunction = True
    model = ct.convert(merged, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                       skip_model_load=True)
    model.save(str(dest))


def _part_program(inp: LowerInput, start: int, end: int, parts: int) -> ExportedProgram:
    """The weight-free program of layers [start, end): the traced whole for one part, else that part
    traced from the same canonical model code (exporter.model.MistralPart) in the same dtype."""
    if parts == 1:
        return inp.program()
    dtype = inp.trace.spec.dtype
    return traced(TraceSpec(inp.config, inp.capacity, dtype, layers=(start, end))).program


def _write_part(inp: LowerInput, compress: Any, program: ExportedProgram, layers: range,
                functions: dict[str, int], dest: Path, step: Any) -> None:
    """Convert each function of the weight-free part, bind its weights in MIL, save them as one package."""
    ct = quiet_coremltools()
    cfg = inp.config
    names = list(program.state_dict)
    dtype = next(iter(program.state_dict.values())).dtype
    graph = decompose(program, expand_gqa=True).module()
    first, last = layers.start == 0, layers.stop == cfg.num_hidden_layers
    wrapper = (IdsWrapper if first else HiddenWrapper)(graph, cfg, inp.capacity, dtype, layers)
    output = "logits" if last else HIDDEN_OUT
    shared: dict[str, Any] = {}
    consts: dict[str, Any] = {}
    converted = {}
    for function, chunk in functions.items():
        step(f"converting {function}")
        example = (torch.zeros(1, chunk, dtype=torch.long) if first
                   else torch.zeros(1, chunk, cfg.hidden_size, dtype=dtype))
        converted[function] = _function(wrapper, example, output, inp, names, shared, compress)
        share_consts(converted[function].functions["main"], consts)
        gc.collect()  # a compressed function's own copies of the weights, now replaced by the first's
    step("writing")
    _save_multifunction(ct, converted, inp.options.deployment_target, dest)


def lower_to_mlpackage(inp: LowerInput, out: Path, compress: Any) -> dict[str, Any]:
    """Write one multifunction mlpackage per part (prefill at each enumerated length, decode at 1,
    sharing one weight file), part after part so only one part's weights are in memory."""
    lengths = prefill_lengths(inp.options.prefill_chunks, inp.capacity)
    parts = plan_parts(inp.config, inp.options.chunks, inp.precision)
    functions = {prefill_name(n): n for n in lengths} | {DECODE: 1}
    total = len(parts) * (len(functions) + 2)  # tracing, each function, writing
    done = 0

    for index, (start, end) in enumerate(parts):
        def step(what: str, index: int = index) -> None:
            nonlocal done
            where = f" part {index + 1}/{len(parts)}" if len(parts) > 1 else ""
            inp.progress(f"coreml{where}: {what}", done / total)
            done += 1

        step("tracing" if len(parts) > 1 else "binding weights")
        program = _part_program(inp, start, end, len(parts))
        _write_part(inp, compress, program, range(start, end), functions, out / part_file(index, len(parts)), step)
        del program
        gc.collect()
    return {"pipeline": describe(inp.config, parts, lengths), "weights": len(parameter_shapes(inp.config))}
