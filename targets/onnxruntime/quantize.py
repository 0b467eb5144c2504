"""Weight-only block quantization for MatMulNBits, through onnxruntime's own quantizer.

``MatMulNBitsQuantizer.process()`` quantizes a whole in-memory ModelProto, so it needs every fp32
weight resident next to its quantized copy. We call the per-tensor kernel it runs for each MatMul
(``DefaultWeightOnlyQuantizer.qbits_block_quant``, same config class, same C++ code) from a lazy
initializer instead, so only one fp32 weight is in memory at a time while the file is written.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Quantizes one weight at a time, keeping only the last result (its three parts are written
    one after another, so each weight is loaded and quantized once)."""

    def __init__(self, spec: QuantSpec) -> None:
        config = DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                              accuracy_level=spec.accuracy_level or None, bits=spec.bits)
        self._quantizer = DefaultWeightOnlyQuantizer(config)
        self._key: str | None = None
        self._parts: dict[str, np.ndarray] = {}

    def encode(self, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B, scales and zero points of an [N, K] weight. The quantizer takes the MatMul layout [K, N]:
        torch transposes in cache-sized tiles, where numpy's strided copy takes 16-23x as long on a
        large matrix (2 s for a 32768 x 1024 lm_head)."""
        return self._quantizer.qbits_block_quant(weight.float().t().contiguous().numpy())

    def part(self, key: str, part: str, load: Callable[[], torch.Tensor]) -> np.ndarray:
        """Part B, scales or zero_points of the weight `key`; load() gives it as [N, K] float."""
        if self._key != key:
            self._parts = {}  # release the previous weight before loading the next
            packed, scales, zero_points = self.encode(load())
            self._key, self._parts = key, {"B": packed, "scales": scales, "zero_points": zero_points}
        return self._parts[part]
