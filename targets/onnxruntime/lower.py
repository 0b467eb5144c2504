"""lower(): program -> ONNX graph -> passes -> model.onnx + model.onnx.data (+ genai_config.json)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from exporter.checkpoint import DTYPES
from exporter.contract import CacheContract, TensorSpec
from exporter.errors import UserError
from exporter.model import parameter_shapes
from exporter.trace import TracedProgram, trace_dtype, traced
from targets.base import LowerInput, Lowered
from targets.onnxruntime import kernels
from targets.onnxruntime.export import quiet, save, to_onnx
from targets.onnxruntime.graph_cache import GraphCache, graph_spec
from targets.onnxruntime.genai import genai_config, place_tokenizer, write_genai_config
from targets.onnxruntime.adapters import write_adapters
from targets.onnxruntime.passes.io import canonical_io, genai_io
from targets.onnxruntime.passes.lora import add_lora_inputs
from targets.onnxruntime.passes.packing import pack_qkv
from targets.onnxruntime.passes.reshapes import drop_reshape_roundtrips
from targets.onnxruntime.passes.rotary import fuse_rotary
from targets.onnxruntime.passes.upcast import compute_in_fp32
from targets.onnxruntime.passes.weights import bind_weights
from targets.onnxruntime.quantize import BITS, QuantSpec
from targets.onnxruntime.replicate import TEMPLATE_LAYERS, ReplicationError
from targets.onnxruntime.target import DATA_FILE, MODEL_FILE, OnnxRuntimeOptions


log = logging.getLogger("mistral_export")

_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
                ir.DataType.INT64: "int64", ir.DataType.INT32: "int32"}


def quant_spec(precision: str, options: OnnxRuntimeOptions) -> QuantSpec | None:
    if precision not in BITS:
        return None
    block = options.block_size
    if block < 16 or block & (block - 1):
        raise UserError(f"option block_size={block} must be a power of two >= 16 (MatMulNBits)")
    if options.accuracy_level not in range(5):
        raise UserError(f"option accuracy_level={options.accuracy_level} must be 0..4 (MatMulNBits)")
    return QuantSpec(BITS[precision], block, options.symmetric, options.accuracy_level)


def lm_head_spec(quant: QuantSpec | None, options: OnnxRuntimeOptions) -> Callable[[tuple[str, ...]], QuantSpec | None]:
    """Each MatMul weight's quantization: quant, but lm_head float (quantize_lm_head=false) or at
    lm_head_bits (8 under int4: the largest single MatMul, the one whose error reaches the logits
    unmixed, at twice the bytes; optimum-intel's int4 default keeps it int8 too)."""
    if options.lm_head_bits not in (0, 4, 8):
        raise UserError(f"option lm_head_bits={options.lm_head_bits} must be 0 (the precision's), 4 or 8")
    head = None if quant is None or not options.quantize_lm_head else \
        dataclasses.replace(quant, bits=options.lm_head_bits or quant.bits)
    return lambda names: head if names == ("lm_head.weight",) else quant


def buffer_rows(capacity: int, slack: int) -> int:
    """Rows of the GQA cache buffer: the window plus slack (auto: an eighth, at least 8)."""
    if slack < -1:
        raise UserError(f"option cache_slack={slack} must be -1 (auto) or >= 0")
    return capacity + (max(8, capacity // 8) if slack == -1 else slack)


# Positions a fused RoPE table holds at most (64 MB of fp32 cos/sin at head_dim 128): a config's
# max_position_embeddings may be huge (1e9), and the table is allocated at load.
MAX_ROTARY_ROWS = 1 << 17


def rotary_rows(cfg: Any, capacity: int) -> int:
    """Positions the artifact can be asked for: the context without a window, else the model's
    trained positions, capped at MAX_ROTARY_ROWS (the runner refuses positions past the table)."""
    if cfg.sliding_window is None:
        return capacity
    return max(capacity, min(cfg.max_position_embeddings, MAX_ROTARY_ROWS))


def io_specs(model: ir.Model) -> list[TensorSpec]:
    """The graph's inputs and outputs as the manifest's IO contract."""
    def role(name: str, output: bool) -> str:
        if name.startswith(("past", "present")):
            kind = "key" if "key" in name.rsplit(".", 1)[-1] or "_key" in name else "value"
            return f"cache_{'out' if output else 'in'}:{kind}:{''.join(c for c in name if c.isdigit())}"
        return {"position_ids": "positions (-1 = padding)", "positions": "positions (-1 = padding)",
                "attention_mask": "attention_mask (1 per token held, past and current)"}.get(name, name)

    def spec(v: ir.Value, output: bool) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else str(d) for d in (v.shape or ()))
        dtype = _DTYPE_NAMES.get(v.dtype, str(v.dtype))  # type: ignore[arg-type]
        return TensorSpec(v.name or "", dtype, dims, role(v.name or "", output))

    return [spec(v, False) for v in model.graph.inputs] + [spec(v, True) for v in model.graph.outputs]


def cache_contract(inp: LowerInput, dtype: str, attention: str) -> CacheContract:
    cfg = inp.config
    if attention == kernels.GQA:
        layout = ("BNSH[batch,kv_heads,buffer,head_dim]: GQA sliding_window_cache, the most recent positions "
                  "contiguous from row 0 (not a ring); buffer = capacity + slack")
        residence = "runner-held, shared past/present buffer updated in place"
    else:
        layout, residence = "BNSH[batch,kv_heads,capacity,head_dim] ring at position % capacity", "explicit-io"
    return CacheContract(capacity=inp.capacity, window=cfg.sliding_window, layout=layout, dtype=dtype,
                         num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, residence=residence)


def template(inp: LowerInput, attention: str) -> TracedProgram:
    """The program torch.onnx translates: the model's first TEMPLATE_LAYERS layers, whose second layer
    replicate.py copies for the rest; the whole program when it has no more layers than that, or for
    the fallback form, whose decomposed attention shares activations (its masks) between layers."""
    spec = inp.trace.spec
    if attention != kernels.GQA or spec.layers is not None or spec.config.num_hidden_layers <= TEMPLATE_LAYERS:
        return inp.trace
    # Through the trace cache like the whole program (on or off with it: exporter.trace_cache.caching).
    return traced(dataclasses.replace(spec, config=dataclasses.replace(spec.config, num_hidden_layers=TEMPLATE_LAYERS)))


def _graph(inp: LowerInput, options: OnnxRuntimeOptions, attention: str,
           source: TracedProgram) -> tuple[ir.Model, dict[str, Any]]:
    """The ONNX model translated from source (the whole program or its template) with the passes
    applied, and what the manifest records about them."""
    cfg = inp.config
    dtype = torch.float32 if _upcast(inp) else DTYPES[trace_dtype(inp.precision)]  # of the rotary tables
    inp.progress("onnx: translating the program", 0.0)
    # The traced program itself, not inp.program(): a deepcopy materializes its zero-stride weight
    # placeholders (measured: +2.1 GB for a 0.5B model). Nothing here mutates it: torch.onnx.export
    # and decompose() build new programs (tests/test_onnxruntime.py checks that it is unchanged).
    try:
        model = to_onnx(source.program, cfg, inp.capacity, attention)
    except ReplicationError as exc:  # a torch.onnx whose graph is not laid out as replicate.py reads it
        log.warning("translating all %d layers: %s", cfg.num_hidden_layers, exc)
        source = inp.trace
        model = to_onnx(source.program, cfg, inp.capacity, attention)
    extra: dict[str, Any] = {"translated_layers": source.spec.layer_count}
    if attention == kernels.GQA:
        genai_io(model, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
        extra["cache_buffer_rows"] = buffer_rows(inp.capacity, options.cache_slack)
        if options.fuse_rotary and cfg.head_dim % 16 == 0:  # GQA's rotary kernel needs head_size % 16 == 0
            rows = rotary_rows(cfg, inp.capacity)
            fused = fuse_rotary(model, cfg, rows, dtype)
            if fused != cfg.num_hidden_layers:
                raise RuntimeError(f"RoPE folded into {fused} of {cfg.num_hidden_layers} GQA nodes: "
                                   "the graph pattern changed")
            extra["rotary_positions"] = rows
        extra["rotary"] = "GroupQueryAttention do_rotary" if "rotary_positions" in extra else "graph (Mul/Add)"
    else:
        canonical_io(model, cfg.num_hidden_layers)
    drop_reshape_roundtrips(model)
    adapted = {w for a in inp.adapters.values() for w in a.deltas}
    if adapted:  # after the IO pass, which expects the canonical inputs; before packing
        extra["lora_inputs"] = add_lora_inputs(model, adapted)
    if attention == kernels.GQA and options.pack_qkv:
        extra["packed_qkv"] = pack_qkv(model)
    return model, extra


def _cached_graph(inp: LowerInput, options: OnnxRuntimeOptions, attention: str) -> tuple[ir.Model, dict[str, Any]]:
    """_graph through the lowered-graph cache (graph_cache.py); adapters' graphs are not cached."""
    source = template(inp, attention)
    cache = None if inp.adapters else GraphCache.open()
    if cache is None:
        model, extra = _graph(inp, options, attention, source)
        return model, {**extra, "graph_cache": "off"}
    # Everything _graph reads: the program (by content, so a program that is not its trace spec's
    # can never be answered with that spec's graph), the config and capacity, and these settings.
    settings = {"config": inp.config.to_dict(), "capacity": inp.capacity, "attention": attention,
                "upcast": _upcast(inp), "fuse_rotary": options.fuse_rotary, "pack_qkv": options.pack_qkv,
                "cache_slack": options.cache_slack}
    # A hit never deserializes the program: the digest comes from its trace-cache bytes.
    hit = cache.load(graph_spec(source.digest, settings), parameter_shapes(inp.config))
    if hit is not None:
        inp.progress("onnx: lowered graph from the cache", 0.0)
        return hit[0], {**hit[1], "graph_cache": "hit"}
    model, extra = _graph(inp, options, attention, source)
    # Again after _graph: a trace-cache entry that failed its check when loaded was traced afresh.
    cache.store(graph_spec(source.digest, settings), model, extra)
    return model, {**extra, "graph_cache": "miss"}


def lower_to_files(inp: LowerInput, out_dir: Path) -> Lowered:
    options: OnnxRuntimeOptions = inp.options
    chosen = kernels.choose(inp.device, inp.precision, options.attention)
    quant = quant_spec(inp.precision, options)
    spec_for = lm_head_spec(quant, options)  # checks the option before any work
    with quiet():
        model, extra = _cached_graph(inp, options, chosen.attention)
        extra["weight_map"] = bind_weights(model, inp.weight, quant, spec_for)
        if _upcast(inp):
            compute_in_fp32(model)
    save(model, out_dir / MODEL_FILE, DATA_FILE, inp.progress, "onnx")
    if inp.adapters:
        extra["adapters"] = write_adapters(out_dir, inp.adapters, extra["lora_inputs"])
    if chosen.attention == kernels.GQA:
        window = inp.config.sliding_window
        context = extra.get("rotary_positions", inp.config.max_position_embeddings) if window else inp.capacity
        write_genai_config(out_dir, genai_config(inp.config, MODEL_FILE, context, window, inp.device))
        extra["genai_tokenizer"] = place_tokenizer(inp.tokenizer_dir, out_dir)
    dtype = inp.precision if inp.precision in ("fp16", "bf16") and not _upcast(inp) else "fp32"
    if _upcast(inp):
        extra["compute"] = "fp32: fp16 weights are cast once at session start (x86 ORT has no fp16 GEMM)"
    extra.update(attention=chosen.attention, kernels={inp.device: chosen.describe()},
                 quantization=None if quant is None else quant.__dict__, graph_ops=_op_counts(model))
    return Lowered(io=io_specs(model), cache=cache_contract(inp, dtype, chosen.attention), extra=extra)


def _upcast(inp: LowerInput) -> bool:
    """fp16 on CPU stores fp16 weights and computes in fp32 (passes/upcast.py)."""
    return inp.device == "cpu" and inp.precision == "fp16"


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
