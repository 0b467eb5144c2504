"""The parity reference: the canonical exported program in fp32, bound to the artifact's source weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointFolder, PresetWeights, WeightSource, expected_shapes
from exporter.config import MistralConfig
from exporter.errors import UserError
from exporter.trace import TraceSpec, bind, traced
from targets.reference import ProgramRunner


def source_from_manifest(manifest: dict[str, Any], checkpoint: Path | None = None) -> WeightSource:
    """The weights an artifact was built from: its preset, or its checkpoint folder if unchanged."""
    model = manifest["model"]
    origin = model["source"]
    if origin.startswith("preset:") and checkpoint is None:
        _, name, seed = origin.split(":")
        return PresetWeights(name, int(seed.removeprefix("seed")))
    folder = checkpoint or (Path(model["path"]) if model.get("path") else None)
    if folder is None or not folder.is_dir():
        raise UserError(f"the reference weights for this artifact are not here (built from {model.get('path')}); "
                        "pass --reference-checkpoint DIR with the original checkpoint")
    source = CheckpointFolder(folder)
    if source.fingerprint() != origin:
        raise UserError(f"checkpoint {folder} differs from the one this artifact was built from (file hashes "
                        "differ); pass the original with --reference-checkpoint")
    return source


# Share of host memory an fp32 reference may take; above it the reference runs in bf16.
FP32_BUDGET = 0.35


def reference_dtype(manifest: dict[str, Any], choice: str = "auto") -> torch.dtype:
    """fp32 unless its weights would take more than FP32_BUDGET of this machine's memory (a 7B model
    needs 28 GB in fp32). bf16 weights of a bf16 checkpoint bind as memory-mapped, file-backed pages,
    so the reference then adds no second resident copy of the model next to the target's."""
    if choice != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]
    import psutil

    cfg = MistralConfig(**manifest["model"]["config"])
    params = sum(math.prod(s) for s in expected_shapes(cfg).values())
    return torch.float32 if 4 * params <= FP32_BUDGET * psutil.virtual_memory().total else torch.bfloat16


def reference_runner(manifest: dict[str, Any], source: WeightSource,
                     dtype: torch.dtype = torch.float32) -> ProgramRunner:
    """The canonical program at the artifact's cache capacity, weights bound by name."""
    cfg = MistralConfig(**manifest["model"]["config"])
    capacity = manifest["cache"]["capacity"]
    program = traced(TraceSpec(cfg, capacity, dtype)).program
    bind(program, lambda name: source.parameter(name, dtype))
    return ProgramRunner(program, capacity, cfg.sliding_window)
