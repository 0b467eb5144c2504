"""The parity reference: the canonical exported program in fp32, bound to the artifact's source weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointFolder, PresetWeights, WeightSource
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


def reference_runner(manifest: dict[str, Any], source: WeightSource) -> ProgramRunner:
    """fp32 canonical program at the artifact's cache capacity, weights bound by name."""
    cfg = MistralConfig(**manifest["model"]["config"])
    capacity = manifest["cache"]["capacity"]
    program = traced(TraceSpec(cfg, capacity, torch.float32)).program
    bind(program, lambda name: source.parameter(name, torch.float32))
    return ProgramRunner(program, capacity, cfg.sliding_window)
