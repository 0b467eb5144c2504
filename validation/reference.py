"""The parity reference: the eager canonical model, bound to the artifact's source weights.

It is computed independently of the build: no torch.export, no trace cache, nothing the artifact
holds. The weights come from the checkpoint folder the manifest names (its file hashes must equal the
recorded ones) or from the preset and seed the manifest records.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

import numpy as np
from torch import nn

from exporter.checkpoint import PresetWeights, WeightSource, expected_shapes
from exporter.sources import open_folder
from exporter.config import MistralConfig
from exporter.errors import UserError
from exporter.model import MistralModel, empty_caches


def source_from_manifest(manifest: dict[str, Any], checkpoint: Path | None = None,
                         adapter: Path | None = None) -> WeightSource:
    """The weights an artifact was built from: its preset, or its checkpoint folder if unchanged, with
    the LoRA adapter it records merged in (that adapter's files must be unchanged too)."""
    source = _checkpoint_from_manifest(manifest, checkpoint)
    recorded = manifest["model"].get("adapter")
    if recorded is None:
        return source
    return _adapted(source, recorded, adapter, "pass --reference-adapter DIR with the original adapter folder")


def runtime_adapter_source(manifest: dict[str, Any], base: WeightSource, name: str) -> WeightSource:
    """The base weights with one of the artifact's switchable adapters merged, from the folder it records."""
    return _adapted(base, manifest["target"]["adapters"][name]["source"], None,
                    f"restore that folder to validate adapter {name!r}, or validate the base alone with --adapter none")


def _adapted(base: WeightSource, recorded: dict[str, Any], folder: Path | None, fix: str) -> WeightSource:
    """base with the recorded adapter merged, read from folder (default: the recorded path), unchanged."""
    from exporter.adapter import AdaptedWeights, check_recorded

    folder = folder or Path(recorded["path"])
    if not folder.is_dir():
        raise UserError(f"the LoRA adapter this artifact was built with is not here ({recorded['path']}); {fix}")
    adapted = AdaptedWeights(base, folder)
    check_recorded(adapted.adapter, recorded)
    return adapted


def _checkpoint_from_manifest(manifest: dict[str, Any], checkpoint: Path | None) -> WeightSource:
    model = manifest["model"]
    origin = model["source"]
    if origin.startswith("preset:") and checkpoint is None:
        _, name, seed = origin.split(":")
        return PresetWeights(name, int(seed.removeprefix("seed")))
    folder = checkpoint or (Path(model["path"]) if model.get("path") else None)
    if folder is None or not folder.is_dir():
        raise UserError(f"the reference weights for this artifact are not here (built from {model.get('path')}); "
                        "pass --reference-checkpoint DIR with the original checkpoint")
    source = open_folder(folder)
    if source.fingerprint() != origin:
        raise UserError(f"checkpoint {folder} differs from the one this artifact was built from (file hashes "
                        "differ); pass the original with --reference-checkpoint")
    return source


# Share of host memory an fp32 reference may take; above it the reference runs in bf16.
FP32_BUDGET = 0.35
# Below this many parameters the reference steps on one thread. It alternates with the target's
# runtime on the same cores, and each side's idle workers spin after its step (torch's OpenMP after
# each parallel region, ONNX Runtime's after each run): on small models each then mostly waits for
# the other. Measured on 2 cores, tiny preset interleaved with ONNX Runtime, per 16-token step:
# reference 12 ms on 2 threads, 2.3 ms on 1; ONNX Runtime 1.8 ms beside it, 0.7 ms.
SMALL_MODEL_PARAMETERS = 32_000_000


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


class EagerRunner:
    """The canonical nn.Module run eagerly (Runner contract), its parameters taken from a lookup as
    they are: a memory-mapped bf16 tensor stays file-backed, nothing is copied."""

    def __init__(self, cfg: MistralConfig, capacity: int, lookup: Any, dtype: torch.dtype) -> None:
        with torch.device("meta"):
            model = MistralModel(cfg).eval()
        for name, _ in list(model.named_parameters(remove_duplicate=False)):
            owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            owner._parameters[attr] = nn.Parameter(lookup(name), requires_grad=False)
        self.model, self.cfg, self.dtype = model, cfg, dtype
        self.capacity, self.window = capacity, cfg.sliding_window
        self.threads = torch.get_num_threads()
        small = sum(math.prod(s) for s in expected_shapes(cfg).values()) < SMALL_MODEL_PARAMETERS
        self.step_threads = 1 if small else self.threads
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def reset(self, batch_size: int) -> None:
        self.k, self.v = empty_caches(self.cfg, batch_size, self.capacity, self.dtype)

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.step_threads)
        try:
            with torch.no_grad():
                logits, self.k, self.v = self.model(torch.as_tensor(input_ids, dtype=torch.long),
                                                    torch.as_tensor(positions, dtype=torch.long), self.k, self.v)
        finally:
            torch.set_num_threads(threads)
        return logits.float().numpy()


def reference_runner(manifest: dict[str, Any], source: WeightSource,
                     dtype: torch.dtype = torch.float32) -> EagerRunner:
    """The eager canonical model at the artifact's cache capacity, weights bound by name."""
    cfg = MistralConfig(**manifest["model"]["config"])
    return EagerRunner(cfg, manifest["cache"]["capacity"], lambda name: source.parameter(name, dtype), dtype)
