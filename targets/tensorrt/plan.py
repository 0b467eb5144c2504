"""Optimization profiles and the engine build plan (the exact trtexec command line).

Two profiles over the same ONNX: prefill (chunk 1..C, tuned at C) and decode (chunk fixed at 1).
Kernels are tuned at each profile's opt shape, so decode, the step that runs most, gets its own.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import Any

PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class Shape:
    """min / opt / max of one input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, Shape]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: asdict(v) for k, v in self.shapes.items()}}


def profiles(layers: int, kv_heads: int, head_dim: int, capacity: int,
             min_batch: int, opt_batch: int, max_batch: int) -> list[Profile]:
    """[prefill, decode]: token inputs [B, T], caches [B, Hkv, C, D] for every layer."""
    batch = (min_batch, opt_batch, max_batch)

    def token(t: tuple[int, int, int]) -> Shape:
        return Shape(*((b, n) for b, n in zip(batch, t)))

    cache = Shape(*((b, kv_heads, capacity, head_dim) for b in batch))
    caches = {f"past_{kind}.{i}": cache for kind in ("key", "value") for i in range(layers)}
    result = []
    for name, chunk in (("prefill", (1, capacity, capacity)), ("decode", (1, 1, 1))):
        result.append(Profile(name, {"input_ids": token(chunk), "positions": token(chunk), **caches}))
    return result


def _spec(shapes: dict[str, Shape], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, getattr(s, which)))}" for name, s in shapes.items())


def trtexec_command(onnx: str, engine: str, plans: list[Profile], optimization_level: int,
                    timing_cache: str | None) -> list[str]:
    """trtexec line building one strongly typed engine with all profiles (`--profile=N` then its shapes)."""
    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", "--stronglyTyped",
           f"--builderOptimizationLevel={optimization_level}", "--skipInference"]
    for index, profile in enumerate(plans):
        cmd += [f"--profile={index}", f"--minShapes={_spec(profile.shapes, 'min')}",
                f"--optShapes={_spec(profile.shapes, 'opt')}", f"--maxShapes={_spec(profile.shapes, 'max')}"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def build_script(command: list[str]) -> str:
    """build_engine.sh: run from the artifact folder on a machine with TensorRT and a GPU."""
    return ("#!/usr/bin/env bash\n"
            "# Builds engine.plan from model.onnx with the prefill and decode profiles.\n"
            "# Equivalent Python path: mistral-export build --target tensorrt (where tensorrt is importable).\n"
            "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + shlex.join(command) + "\n")
