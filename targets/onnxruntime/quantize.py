"""Weight-only block quantization for MatMulNBits, through onnxruntime's own quantizer.

``MatMulNBitsQuantizer.process()`` quantizes a whole in-memory ModelProto, so it needs every fp32
weight resident next to its quantized copy. We call the per-tensor kernel it runs for each MatMul
(``DefaultWeightOnlyQuantizer.qbits_block_quant``, same config class, same C++ code) from a lazy
initializer instead, so only one fp32 weight is in memory at a time while the file is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
)

BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class QuantSpec:
    """MatMulNBits settings: bits, block along K, symmetry, and ORT's accuracy_level."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Shapes of MatMulNBits' B, scales and packed zero points for an [N, K] weight."""
        blocks = -(-k // self.block_size)
        per_byte = 8 // self.bits
        return {"B": (n, blocks, self.block_size // per_byte), "scales": (n, blocks),
                "zero_points": (n, -(-blocks // per_byte))}


class BlockQuantizer:
    """Quantizes one weight at a time per writer thread (export.save writes on several): the first part
    asked for of a weight quantizes it, and its other parts wait for that and are kept only until they
    are written, so each weight is loaded and quantized once."""

    def __init__(self, spec: QuantSpec) -> None:
        config = DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                              accuracy_level=spec.accuracy_level or None, bits=spec.bits)
        self._quantizer = DefaultWeightOnlyQuantizer(config)
        self._parts = 3 if not spec.symmetric else 2  # B, scales (and zero_points): one request each
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Future[dict[str, np.ndarray]], set[str]]] = {}

    def part(self, key: str, part: str, load: Callable[[], torch.Tensor]) -> np.ndarray:
        """Part B, scales or zero_points of the weight `key`; load() gives it as [N, K] float."""
        with self._lock:
            first = key not in self._pending
            if first:
                self._pending[key] = (Future(), set())
            future, served = self._pending[key]
            served.add(part)
            if len(served) == self._parts:
                del self._pending[key]  # the last part: nothing keeps the weight's parts after this
        if first:
            try:
                future.set_result(self._quantize(load))
            except BaseException as exc:
                future.set_exception(exc)
        return future.result()[part]

    def _quantize(self, load: Callable[[], torch.Tensor]) -> dict[str, np.ndarray]:
        weight = load().float().numpy()  # [N, K]; the quantizer takes the MatMul layout [K, N]
        packed, scales, zero_points = self._quantizer.qbits_block_quant(np.ascontiguousarray(weight.T))
        return {"B": packed, "scales": scales, "zero_points": zero_points}
