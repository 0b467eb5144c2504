"""Reference target: runs the canonical exported program itself through PyTorch.

It is the parity reference for every other target and the plumbing test of the contract. The
artifact holds the weight-free program (program.pt2) and the weights (model.safetensors); loading
binds them by name. Its only kernel is the canonical cached_attention op (SDPA underneath).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.export import ExportedProgram

from exporter import program_file
from exporter.checkpoint import DTYPES
from exporter.config import MistralConfig
from exporter.contract import cache_contract, canonical_io
from exporter.errors import ArtifactError
from exporter.trace import bind, save_program
from targets.base import LowerInput, Lowered, check_supported
from targets.resources import ExportMemory

PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ReferenceOptions:
    """The reference target has no tuning knobs."""


class ProgramRunner:
    """Runs an exported canonical program (weights bound) with runner-held caches."""

    def __init__(self, program: ExportedProgram, capacity: int, window: int | None,
                 device: str = "cpu") -> None:
        if device != "cpu":
            program = torch.export.passes.move_to_device_pass(program, device)
        self.module = program.module()
        self.device = device
        self.capacity = capacity
        self.window = window
        self.threads = torch.get_num_threads()
        self.dtype = next(iter(program.state_dict.values())).dtype
        self._cache_shape = self._shape_from(program)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @staticmethod
    def _shape_from(program: ExportedProgram) -> tuple[int, int, int]:
        layers = sum(1 for n in program.graph.nodes if n.op == "placeholder" and n.name.startswith("k_caches"))
        spec = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name.startswith("k_caches"))
        return layers, int(spec.meta["val"].shape[1]), int(spec.meta["val"].shape[3])

    def reset(self, batch_size: int) -> None:
        layers, heads, dim = self._cache_shape
        shape = (batch_size, heads, self.capacity, dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits, self.k, self.v = self.module(ids, pos, self.k, self.v)
        return logits.float().cpu().numpy()


class ReferenceTarget:
    """The canonical program on PyTorch (CPU, or CUDA where torch has it)."""

    name = "reference"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16", "bf16")
    options_type = ReferenceOptions
    # Binds the program's fp32 weights and writes them (declared, not measured).
    export_memory = ExportMemory(fp32_factor=1.0, output_factor=1.0)
    device_resources = {"cuda": "GPU"}

    def check_available(self) -> str | None:
        return None

    def kernels(self) -> dict[str, str]:
        return {f"{d}/{p}": "mistral_export::cached_attention (torch SDPA)" for d in self.devices
                for p in self.precisions}

    def lower(self, inp: LowerInput, out_dir: Path) -> Lowered:
        check_supported(self, inp.device, inp.precision)
        save_program(inp.traced, out_dir / PROGRAM_FILE)
        names = list(inp.traced.state_dict)
        tensors = {}
        for i, name in enumerate(names):
            tensors[name] = inp.weight(name).contiguous()
            inp.progress(f"weights {name}", (i + 1) / len(names))
        # Tied weights are one storage; safetensors refuses shared storage, so keep one copy of each.
        if inp.config.tie_word_embeddings:
            tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
        save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        dtype = inp.precision
        return Lowered(io=canonical_io(inp.config, dtype),
                       cache=cache_contract(inp.config, inp.capacity, dtype, residence="runner-held"),
                       extra={"kernels": {inp.device: "mistral_export::cached_attention (torch SDPA)"}})

    def load(self, artifact: Path, manifest: dict[str, Any], device: str | None) -> ProgramRunner:
        device = device or manifest["target"]["device"]
        check_supported(self, device, manifest["target"]["precision"])
        cache = manifest["cache"]
        return ProgramRunner(load_program(artifact, manifest), cache["capacity"], cache["window"], device)


def load_program(artifact: Path, manifest: dict[str, Any]) -> ExportedProgram:
    """The artifact's exported program, read without unpickling anything and checked against the
    manifest's config, capacity and dtype, with its weights bound from the safetensors file."""
    cfg = MistralConfig(**manifest["model"]["config"])
    dtype = DTYPES[manifest["target"]["precision"]]
    try:
        program = program_file.read_archive(artifact / PROGRAM_FILE, cfg, manifest["cache"]["capacity"], dtype)
    except program_file.ProgramError as exc:
        raise ArtifactError(f"{artifact / PROGRAM_FILE} is not the program its manifest describes: {exc}; "
                            "rebuild the artifact") from None
    with safe_open(artifact / WEIGHTS_FILE, framework="pt") as fh:
        return bind(program, fh.get_tensor)



