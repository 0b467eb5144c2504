"""Runners for a Core ML artifact: the MIL-level interpreter (any OS) and MLModel.predict (macOS).

Both keep one state per batch row (the functions take batch 1) and run rows one after another: rows
are independent sequences, so this is the same computation as a batched step. A chunk of T > 1
tokens goes through `prefill`, padded to the capacity with position -1; T == 1 uses `decode`.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from targets.coreml.lower import MODEL_FILE, state_name


class _RowRunner:
    """Shared batching: split rows, pick the function, pad prefill chunks."""

    level = "device"

    def __init__(self, capacity: int, window: int | None, layers: int, state_shape: tuple[int, ...]) -> None:
        self.capacity = capacity
        self.window = window
        self.layers = layers
        self.state_shape = state_shape
        self.rows: list[Any] = []

    def _new_state(self) -> Any:
        raise NotImplementedError

    def _call(self, function: str, ids: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        raise NotImplementedError

    def reset(self, batch_size: int) -> None:
        self.rows = [self._new_state() for _ in range(batch_size)]

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        t = input_ids.shape[1]
        out = []
        for b, state in enumerate(self.rows):
            ids, pos = input_ids[b:b + 1].astype(np.int32), positions[b:b + 1].astype(np.int32)
            if t == 1:
                out.append(self._call("decode", ids, pos, state))
                continue
            pad = self.capacity - t
            ids = np.pad(ids, ((0, 0), (0, pad)))
            pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
            out.append(self._call("prefill", ids, pos, state)[:, :t])
        return np.concatenate(out).astype(np.float32)


class MilRunner(_RowRunner):
    """Executes the saved mlpackage's MIL with coremltools' value inference (level mil-reference)."""

    level = "mil-reference"

    def __init__(self, artifact: Path, capacity: int, window: int | None, layers: int,
                 state_shape: tuple[int, ...]) -> None:
        super().__init__(capacity, window, layers, state_shape)
        self.program = load_mil_program(artifact / MODEL_FILE)

    def _new_state(self) -> dict[str, np.ndarray]:
        return {state_name(kind, i): np.zeros(self.state_shape, np.float16)
                for i in range(self.layers) for kind in ("k", "v")}

    def _call(self, function: str, ids: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        from targets.coreml.mil_eval import run_function

        return run_function(self.program.functions[function], {"input_ids": ids, "positions": pos}, state)["logits"]

    def describe_device(self) -> str:
        return f"coremltools MIL value inference on {platform.system()} {platform.machine()} (not a Core ML device run)"


class DeviceRunner(_RowRunner):
    """MLModel.predict with make_state() per row, on macOS, per compute unit."""

    def __init__(self, artifact: Path, capacity: int, window: int | None, layers: int,
                 state_shape: tuple[int, ...], compute_units: str) -> None:
        super().__init__(capacity, window, layers, state_shape)
        from targets.coreml.lower import quiet_coremltools

        ct = quiet_coremltools()
        units = getattr(ct.ComputeUnit, compute_units)
        path = str(artifact / MODEL_FILE)
        self.compute_units = compute_units
        self.models = {f: ct.models.MLModel(path, compute_units=units, function_name=f) for f in ("prefill", "decode")}

    def _new_state(self) -> dict[str, Any]:
        # One MLState per function model; `current` says which holds the live cache.
        return {"current": "decode", **{f: m.make_state() for f, m in self.models.items()}}

    def _call(self, function: str, ids: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        if state["current"] != function:
            # The functions share state shapes but not MLState objects: carry the cache across.
            for i in range(self.layers):
                for kind in ("k", "v"):
                    name = state_name(kind, i)
                    state[function].write_state(name, state[state["current"]].read_state(name))
            state["current"] = function
        return self.models[function].predict({"input_ids": ids, "positions": pos}, state=state[function])["logits"]

    def describe_device(self) -> str:
        return f"Core ML on {platform.mac_ver()[0] or platform.system()} {platform.machine()}, {self.compute_units}"


def load_mil_program(package: Path) -> Any:
    """The pymil Program of a saved mlpackage (all its functions)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    from targets.coreml.lower import quiet_coremltools

    ct = quiet_coremltools()
    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    from targets.coreml.mil_eval import normalize_scalars

    program = milproto_load(spec, spec.specificationVersion, str(weights))
    normalize_scalars(program)
    return program
