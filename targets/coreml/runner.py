"""Runners for a Core ML artifact: the MIL-level interpreter (any OS) and MLModel.predict (macOS).

Both follow the manifest's pipeline (targets/coreml/pipeline.py): a chunk of T tokens is cut into
pieces that each run through one function (the smallest prefill length that holds them, pieces of the
largest while more remain, decode for one token), padded with position -1; each piece runs through the
parts in order, each part with its own layers' states. Both keep one state per batch row (the
functions take batch 1) and run rows one after another: rows are independent sequences, so this is
the same computation as a batched step. `padding()` counts tokens computed against real tokens.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from targets.coreml.pipeline import PACKAGE_SPEC, PACKAGE_WEIGHTS, Part, Pipeline, schedule


class _RowRunner:
    """Shared batching: split rows, cut chunks into function pieces, pad, chain the parts."""

    level = "device"

    def __init__(self, pipeline: Pipeline, capacity: int, window: int | None,
                 state_shape: tuple[int, ...]) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self.window = window
        self.state_shape = state_shape
        self.rows: list[Any] = []
        self.computed_tokens = 0
        self.real_tokens = 0

    def _new_state(self) -> Any:
        raise NotImplementedError

    def _call(self, part: Part, function: str, x: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        raise NotImplementedError

    def reset(self, batch_size: int) -> None:
        self.rows = [self._new_state() for _ in range(batch_size)]

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = []
        for b, state in enumerate(self.rows):
            pieces, start = [], 0
            for function, length, real in schedule(input_ids.shape[1], self.pipeline.lengths):
                ids = input_ids[b:b + 1, start:start + real].astype(np.int32)
                pos = positions[b:b + 1, start:start + real].astype(np.int32)
                self.computed_tokens += length
                self.real_tokens += int((pos >= 0).sum())
                x = np.pad(ids, ((0, 0), (0, length - real)))
                pos = np.pad(pos, ((0, 0), (0, length - real)), constant_values=-1)
                for part in self.pipeline.parts:
                    x = self._call(part, function, x, pos, state)
                pieces.append(x[:, :real])
                start += real
            out.append(np.concatenate(pieces, axis=1))
        return np.concatenate(out).astype(np.float32)

    def padding(self) -> dict[str, Any]:
        """Tokens the functions computed against the real (non-padding) tokens fed, since load."""
        return {"computed_tokens": self.computed_tokens, "real_tokens": self.real_tokens,
                "overhead": round(self.computed_tokens / self.real_tokens, 4) if self.real_tokens else None,
                "prefill_chunks": list(self.pipeline.lengths)}


class MilRunner(_RowRunner):
    """Executes the saved mlpackages' MIL with coremltools' value inference (level mil-reference)."""

    level = "mil-reference"

    def __init__(self, pipeline: Pipeline, capacity: int, window: int | None, state_shape: tuple[int, ...]) -> None:
        super().__init__(pipeline, capacity, window, state_shape)
        self.programs = {part.path: load_mil_program(part.path) for part in pipeline.parts}

    def _new_state(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(self.state_shape, np.float16) for part in self.pipeline.parts for name in part.states}

    def _call(self, part: Part, function: str, x: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        from targets.coreml.mil_eval import run_function

        result = run_function(self.programs[part.path].functions[function], {part.input: x, "positions": pos}, state)
        return result[part.output]

    def describe_device(self) -> str:
        return f"coremltools MIL value inference on {platform.system()} {platform.machine()} (not a Core ML device run)"


class DeviceRunner(_RowRunner):
    """MLModel.predict with make_state() per row, on macOS, per compute unit."""

    def __init__(self, pipeline: Pipeline, capacity: int, window: int | None, state_shape: tuple[int, ...],
                 compute_units: str) -> None:
        super().__init__(pipeline, capacity, window, state_shape)
        from targets.coreml.lower import quiet_coremltools

        ct = quiet_coremltools()
        units = getattr(ct.ComputeUnit, compute_units)
        self.compute_units = compute_units
        self.models = {(part.path, f): ct.models.MLModel(str(part.path), compute_units=units, function_name=f)
                       for part in pipeline.parts for f in pipeline.functions}

    def _new_state(self) -> dict[Any, Any]:
        # One MLState per (part, function) model; `current` says which function holds a part's live cache.
        return {"current": {part.path: "decode" for part in self.pipeline.parts},
                **{key: model.make_state() for key, model in self.models.items()}}

    def _call(self, part: Part, function: str, x: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        current = state["current"][part.path]
        if current != function:
            # The functions share state shapes but not MLState objects: carry the cache across.
            for name in part.states:
                state[(part.path, function)].write_state(name, state[(part.path, current)].read_state(name))
            state["current"][part.path] = function
        return self.models[(part.path, function)].predict({part.input: x, "positions": pos},
                                                          state=state[(part.path, function)])[part.output]

    def describe_device(self) -> str:
        return f"Core ML on {platform.mac_ver()[0] or platform.system()} {platform.machine()}, {self.compute_units}"


def load_mil_program(package: Path) -> Any:
    """The pymil Program of a saved mlpackage (all its functions), read from the package's fixed layout:
    coremltools' load_spec opens it through libmodelpackage, which rewrites the package's Manifest.json
    (validation must not touch the artifact) and follows whatever paths that file names."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.proto import Model_pb2

    from targets.coreml.lower import quiet_coremltools
    from targets.coreml.mil_eval import normalize_scalars

    quiet_coremltools()
    spec = Model_pb2.Model()
    spec.ParseFromString((package / PACKAGE_SPEC).read_bytes())
    program = milproto_load(spec, spec.specificationVersion, str(package / PACKAGE_WEIGHTS))
    normalize_scalars(program)
    return program
