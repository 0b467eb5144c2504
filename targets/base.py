"""The target contract: three methods and a runner.

A target never re-traces the model. ``lower`` receives the one exported program (weight-free, see
exporter.trace) and a weight source to stream tensors from, and writes its files into a staging
folder that it does not own beyond those files. It must not modify the program in place: targets
that decompose or bind weights work on their own copy (``LowerInput.program()`` hands one out).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.export import ExportedProgram

from exporter.checkpoint import Rows, WeightSource
from exporter.config import MistralConfig
from exporter.contract import CacheContract, TensorSpec
from exporter.errors import UserError
from exporter.trace import TracedProgram

Progress = Callable[[str, float], None]  # (message, fraction done 0..1)


@dataclass(frozen=True)
class LowerInput:
    """What a target lowers from: the exported program, its spec, and the weights to stream."""

    trace: TracedProgram
    config: MistralConfig
    capacity: int
    precision: str
    weights: WeightSource
    device: str
    options: Any
    progress: Progress = field(default=lambda message, fraction: None)
    tokenizer_dir: Path | None = None  # the artifact's tokenizer/ folder, already written, if it has one
    adapters: dict[str, Any] = field(default_factory=dict)  # runtime LoRA adapters by name (exporter.adapter)

    @property
    def traced(self) -> ExportedProgram:
        """The one weight-free program; targets must not modify it (see program())."""
        return self.trace.program

    def program(self) -> ExportedProgram:
        """A private copy of the weight-free program (placeholders are shared, they are tiny)."""
        # Without the memo, deepcopy clones each zero-stride placeholder into a full dense tensor.
        shared = {id(t): t for t in self.traced.state_dict.values()}
        return copy.deepcopy(self.traced, shared)

    def weight(self, name: str) -> torch.Tensor:
        """One weight by canonical parameter name, in the traced dtype (tied lm_head resolved)."""
        return self.weights.parameter(name, self.trace.spec.dtype)

    def weight_rows(self, name: str) -> Rows:
        """One weight to read in blocks of rows, in the checkpoint's own dtype, for targets that
        convert it block by block (whole, in fp32, it would be 4 bytes per parameter in flight)."""
        return self.weights.rows(name)


@dataclass
class Lowered:
    """What ``lower`` reports back: its IO and cache contracts and target-specific manifest fields."""

    io: list[TensorSpec]
    cache: CacheContract
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Readback:
    """A quantized artifact's weights read back from its own files (validation's fidelity question).

    `weights` holds, by canonical name, the values the runtime computes with (dequantized, fp32);
    every stored tensor was also compared with the source weight encoded again by the runtime's own
    quantizer under the recorded settings: `mismatches` names those that differ (exact comparison)."""

    weights: dict[str, torch.Tensor]
    checked: int
    mismatches: list[str]
    method: str
    unchecked: str | None = None  # why no exact comparison was possible, when it was not

    def to_dict(self) -> dict[str, Any]:
        return {"status": "not-run" if self.unchecked else ("failed" if self.mismatches else "passed"),
                "method": self.method, "checked": self.checked, "mismatches": self.mismatches[:20],
                "mismatch_count": len(self.mismatches), "read_back": len(self.weights),
                "reason": self.unchecked}


@runtime_checkable
class Runner(Protocol):
    """Drives one artifact. It holds its cache; the caller only feeds tokens and positions."""

    capacity: int
    window: int | None

    def reset(self, batch_size: int) -> None:
        """Start new sequences: an empty cache for batch_size rows."""

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """input_ids, positions: int64 [B, T] with T <= capacity, -1 positions for padding.
        Returns float32 logits [B, T, V] and advances the cache."""


class Target(Protocol):
    """A backend: declares what it supports, lowers the program, loads a runner."""

    name: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    options_type: type

    def check_available(self) -> str | None:
        """None when usable here, else the one-line reason it is not."""

    def lower(self, inp: LowerInput, out_dir: Path) -> Lowered:
        """Write the target's files into out_dir."""

    def load(self, artifact: Path, manifest: dict[str, Any], device: str | None) -> Runner:
        """A runner for an artifact this target wrote."""


def parse_options(options_type: type, raw: dict[str, str]) -> Any:
    """Build a target's frozen options dataclass from --option key=value strings."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(f"{f.name} (default {f.default!r})" for f in fields.values()) or "none"
        raise UserError(f"unknown option(s) {unknown} for this target; valid options: {valid}")
    values: dict[str, Any] = {}
    for key, text in raw.items():
        kind = type(fields[key].default)
        if kind is bool:
            if text.lower() not in _BOOLS:
                raise UserError(f"option {key}={text!r} is not a boolean; use true or false")
            values[key] = _BOOLS[text.lower()]
            continue
        try:
            values[key] = kind(text)
        except ValueError:
            raise UserError(f"option {key}={text!r} is not a valid {kind.__name__}") from None
    return options_type(**values)


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def check_supported(target: Target, device: str, precision: str,
                    table: dict[str, tuple[str, ...]] | None = None) -> None:
    """Fail before any work on an unsupported (device, precision) pair, listing what is supported."""
    if device not in target.devices:
        raise UserError(f"target '{target.name}' does not support device '{device}'; "
                        f"supported devices: {', '.join(target.devices)}")
    allowed = (table or {}).get(device, target.precisions)
    if precision not in allowed:
        pairs = "; ".join(f"{d}: {', '.join((table or {}).get(d, target.precisions))}" for d in target.devices)
        raise UserError(f"target '{target.name}' does not support precision '{precision}' on '{device}'; "
                        f"supported: {pairs}")


def chunks(length: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) spans of at most size covering range(length)."""
    for start in range(0, length, size):
        yield start, min(start + size, length)
