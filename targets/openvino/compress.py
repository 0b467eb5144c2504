"""Weight-only compression with NNCF (data-free): int8 per channel, int4 per group with an int8 backup.

Streamed by default: each weight is quantized by NNCF's own per-tensor lowering (``compress_weight``)
the moment it is read, and enters the IR already compressed, in the decompression pattern NNCF's
whole-model pass writes (Constant -> Convert f16 [-> Subtract zero point] -> Multiply scale
[-> Reshape groups] -> Convert to the graph's dtype), which the CPU plugin folds into its MatMul and
Gather kernels. So the float model never exists in full and the peak is the compressed model plus one
float tensor. The tests check that the streamed IR equals what ``nncf.compress_weights`` makes of the
bound float model, constant for constant.

Only int4 with ``ratio < 1`` takes the whole-model pass: choosing which weights stay int8 ranks all of
them by sensitivity at once, so it binds the full float model first (about 4 bytes per parameter).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import Rows
from exporter.config import MistralConfig
from targets.openvino.options import OpenVinoOptions, compression_mode, group_size

# Not counted in NNCF's int4 ratio without all_layers: they take the int8 backup (optimum-intel's default).
EDGE_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")
BACKUP_MODE = "int8_asym"

BLOCK_ELEMENTS = 1 << 24  # rows are quantized in blocks of about this many weights (64 MB in fp32)
TensorConfig = Callable[[str], Any]  # canonical weight name -> WeightCompressionConfig, or None = keep float


def record(cfg: MistralConfig, precision: str, options: OpenVinoOptions) -> dict[str, Any]:
    """What the manifest records about compression ({} for float precisions)."""
    mode = compression_mode(precision, options)
    if mode is None:
        return {}
    rec: dict[str, Any] = {"library": "nncf", "mode": mode, "streamed": streamable(precision, options)}
    if precision == "int4":
        # all_layers puts the embedding and lm_head in int4 as well: the lm_head is a fifth of this
        # model's bytes per token. Without it they stay int8; the share (1 - ratio) of the rest is int8 either way.
        rec.update(group_size=group_size(cfg, options), ratio=options.ratio, all_layers=options.all_layers,
                   backup=BACKUP_MODE)
    return rec


def streamable(precision: str, options: OpenVinoOptions) -> bool:
    """Whether every weight's compression is known before reading any (all but int4 with ratio < 1)."""
    return precision != "int4" or options.ratio == 1.0


def tensor_configs(cfg: MistralConfig, precision: str, options: OpenVinoOptions) -> TensorConfig | None:
    """Per-weight NNCF configs for streaming, or None when there is nothing to stream-compress."""
    mode = compression_mode(precision, options)
    if mode is None or not streamable(precision, options):
        return None
    import nncf
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig

    main = WeightCompressionConfig(nncf.CompressWeightsMode(mode), group_size(cfg, options) if precision == "int4" else -1)
    backup = WeightCompressionConfig(nncf.CompressWeightsMode(BACKUP_MODE))
    keep_edges_int8 = precision == "int4" and not options.all_layers

    def config(name: str) -> Any:
        if name.endswith("norm.weight"):  # RMSNorm gains: 1-D, not weights of a MatMul or Gather
            return None
        return backup if keep_edges_int8 and name in EDGE_WEIGHTS else main

    return config


@dataclass
class _Block:
    """An owned copy of one NNCF result tensor: NNCF's compiled lowering reuses its output buffers."""

    raw: np.ndarray  # 4-bit data packed two per byte when typed is set
    shape: list[int]
    typed: object | None  # the ov.Type of an OpenVINO-backed result; None = numpy, one value per element

    @staticmethod
    def of(t: Any) -> _Block:
        from nncf.tensor import TensorBackend

        if t.backend == TensorBackend.ov:
            return _Block(np.array(t.data.data).reshape(-1), list(t.shape), t.data.get_element_type())
        return _Block(np.array(t.data), list(t.shape), None)


def _quantize(tensor: torch.Tensor | Rows, config: Any) -> list[tuple[_Block, _Block, _Block | None]]:
    """NNCF's per-tensor lowering over blocks of rows: rows are quantized independently, and a block
    bounds the lowering's float temporaries (measured: about 3x the fp32 input) to a few hundred MB.
    Returns (data, scale, zero point) per block."""
    from nncf.quantization.algorithms.weight_compression.weight_lowering import compress_weight
    from nncf.tensor import Tensor

    from targets.openvino.weights import to_ov_tensor

    rows = tensor.shape[0]
    blocks = -(-math.prod(tensor.shape) // BLOCK_ELEMENTS)
    # Even row counts keep every block's packed 4-bit data byte-aligned; equal blocks stay large enough
    # for NNCF's optimized (OpenVINO-compiled) lowering, the path it takes for the whole tensor.
    step = -(-rows // blocks)
    step += step % 2
    out = []
    for r in range(0, rows, step):
        # int8/int4 programs are traced in fp32: NNCF's whole-model pass would read fp32 constants.
        block = tensor[r:r + step].to(torch.float32)
        q = compress_weight(Tensor(to_ov_tensor(block)), (1,), config)
        out.append((_Block.of(q.tensor), _Block.of(q.scale), None if q.zero_point is None else _Block.of(q.zero_point)))
    return out


def _join(blocks: list[_Block], dtype: object, name: str) -> object:
    """One Constant from per-block results, stacked along rows."""
    import openvino as ov
    from openvino import opset13 as opset

    if all(b.typed is not None for b in blocks):
        shape = [sum(b.shape[0] for b in blocks), *blocks[0].shape[1:]]
        data = ov.Tensor(np.concatenate([b.raw for b in blocks]), shape, blocks[0].typed)
        return opset.constant(data, shared_memory=False, name=name)
    return opset.constant(np.concatenate([b.raw for b in blocks]), dtype=dtype, name=name)


def compressed(tensor: torch.Tensor | Rows, config: Any, name: str, dtype: object) -> object:
    """The decompression subgraph of one [out, in] weight (a tensor, or rows read block by block),
    quantized along `in`, ending in the graph's dtype; returns its output."""
    import openvino as ov
    from nncf.tensor.functions.openvino_numeric import DTYPE_MAP
    from openvino import opset13 as opset

    blocks = _quantize(tensor, config)
    storage = DTYPE_MAP[config.compression_dtype]
    # Every node named after its weight: an unnamed node gets OpenVINO's per-process counter, and the
    # artifact's bytes would depend on what the process built before (a graph-cache hit builds less).
    node = opset.convert(_join([b[0] for b in blocks], storage, name), ov.Type.f16, name=f"{name}/convert")
    if blocks[0][2] is not None:
        zero_point = _join([b[2] for b in blocks], storage, f"{name}/zero_point")
        node = opset.subtract(node, opset.convert(zero_point, ov.Type.f16, name=f"{name}/zero_point/convert"),
                              name=f"{name}/zero_point/subtract")
    scale = _join([b[1] for b in blocks], ov.Type.f16, f"{name}/scale")
    del blocks
    release()  # the compiled lowering functions hold block-sized buffers; shapes differ per weight anyway
    node = opset.multiply(node, scale, name=f"{name}/fq_weights")
    if config.group_size != -1:
        shape = opset.constant(np.array(tensor.shape, dtype=np.int64), name=f"{name}/shape")
        node = opset.reshape(node, shape, special_zero=False, name=f"{name}/reshape")
    return opset.convert(node, dtype, name=f"{name}/fq_weights/convert").output(0)


def release() -> None:
    """Drop the compiled lowering functions NNCF caches per block shape."""
    from nncf.openvino.optimized_functions import clear_ov_model_cache

    clear_ov_model_cache()


def compress_whole(model: object, cfg: MistralConfig, precision: str, options: OpenVinoOptions) -> None:
    """nncf.compress_weights over the bound float model: the int4 ratio < 1 path."""
    import nncf

    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode(compression_mode(precision, options))}
    if precision == "int4":
        kwargs.update(group_size=group_size(cfg, options), ratio=options.ratio, all_layers=options.all_layers)
    nncf.compress_weights(model, **kwargs)
