"""Trace once: torch.export of the canonical model with fake weights, cached by content hash.

The trace depends only on the config, cache capacity, dtype and tool version, never on weight values,
so it runs on FakeTensors (no weight memory) and the saved program holds zero-stride placeholders.
Real weights are bound by name afterwards (``bind``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim, ExportedProgram

from exporter import __version__
from exporter import attention as attention_module
from exporter import model as model_module
from exporter import program_file
from exporter.checkpoint import DTYPES
from exporter.config import MistralConfig
from exporter.model import MistralModel, MistralPart
from exporter.trace_cache import ProgramCache

MAX_BATCH = 256
log = logging.getLogger("mistral_export")


def _graph_source_hash() -> str:
    """The traced program is a function of the model code and of this file (how it is traced and what
    is saved with it): a change to either must miss the cache."""
    digest = hashlib.sha256()
    for path in (model_module.__file__, attention_module.__file__, __file__):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TraceSpec:
    """Everything the exported graph depends on."""

    config: MistralConfig
    capacity: int
    dtype: torch.dtype
    layers: tuple[int, int] | None = None  # a part [start, end) of the layers (exporter.model.MistralPart)

    def describe(self) -> dict[str, Any]:
        """The spec as JSON data; its hash is the cache key, and the cache sidecar records it."""
        described = {"config": self.config.to_dict(), "capacity": self.capacity, "dtype": str(self.dtype),
                     "tool": __version__, "torch": torch.__version__, "graph": _graph_source_hash()}
        if self.layers is not None:
            described["layers"] = list(self.layers)
        return described

    @property
    def layer_count(self) -> int:
        return self.config.num_hidden_layers if self.layers is None else self.layers[1] - self.layers[0]

    @property
    def takes_ids(self) -> bool:
        """True when the first input is input_ids (the whole model or its first part), else hidden states."""
        return self.layers is None or self.layers[0] == 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:20]


def _example_inputs(spec: TraceSpec) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    # B = T = 2 and a non-empty past: an example of 1 would specialise the dim to a constant.
    # The caches are zero-stride views: export reads only their shape and dtype, and dense ones would
    # cost 2 GiB for Mistral 7B in fp32 (32 layers x K/V x [2, 8, 4096, 128]).
    first = (torch.zeros(2, 2, dtype=torch.long) if spec.takes_ids
             else torch.zeros(1, dtype=spec.dtype).expand(2, 2, spec.config.hidden_size))
    positions = torch.tensor([[3, 4], [5, 6]])
    shape = (2, spec.config.num_key_value_heads, spec.capacity, spec.config.head_dim)
    k, v = ([torch.zeros(1, dtype=spec.dtype).expand(shape) for _ in range(spec.layer_count)] for _ in range(2))
    return first, positions, k, v


def _dynamic_shapes(spec: TraceSpec) -> tuple[object, ...]:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    chunk = Dim("chunk", min=1, max=spec.capacity)
    layers = spec.layer_count
    return ({0: batch, 1: chunk}, {0: batch, 1: chunk}, [{0: batch}] * layers, [{0: batch}] * layers)


def _placeholders(program: ExportedProgram) -> None:
    """Swap weights for zero-stride stand-ins: same shape and dtype, one element of storage."""
    for name, value in list(program.state_dict.items()):
        stub = torch.zeros(1, dtype=value.dtype).expand(value.shape)
        program.state_dict[name] = torch.nn.Parameter(stub, requires_grad=False)


def trace(spec: TraceSpec) -> ExportedProgram:
    """Export the canonical model without real weights."""
    # Parameters are created directly in the target dtype: FakeTensors cannot be converted after.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = (MistralModel(spec.config) if spec.layers is None
                     else MistralPart(spec.config, *spec.layers)).eval()
    finally:
        torch.set_default_dtype(previous)
    program = torch.export.export(model, _example_inputs(spec), dynamic_shapes=_dynamic_shapes(spec))
    _placeholders(program)
    # Not kept: torch.export.save would write them out dense, and every load would read them back.
    program.example_inputs = None
    return program


class TracedProgram:
    """A weight-free exported program and where it came from.

    A trace-cache hit holds the entry's sealed bytes and deserializes them (about 4 s at 155M) only
    when a target asks for `program`: a lowered-graph cache hit needs no more than `digest`. Loading
    verifies the program against its spec; an entry that fails is one warning, and a fresh trace
    (which replaces the entry) is used instead, so `cache_hit` is final only once `program` was read.
    """

    def __init__(self, spec: TraceSpec, cache_hit: bool, seconds: float, program: ExportedProgram | None = None,
                 data: bytes | None = None, cache: ProgramCache | None = None) -> None:
        if program is None and data is None:
            raise ValueError("a TracedProgram needs a program or its serialized bytes")
        self.spec, self.cache_hit, self.seconds = spec, cache_hit, seconds
        self._program, self._data, self._cache = program, data, cache
        self._digest: str | None = None

    @property
    def program(self) -> ExportedProgram:
        if self._program is None:
            assert self._data is not None
            spec = self.spec
            loaded = self._cache.load(spec.key(), self._data, spec.config, spec.capacity, spec.dtype) \
                if self._cache is not None else None
            if loaded is None:  # the entry failed its check (one warning said so): trace afresh
                start = time.perf_counter()
                loaded = trace(spec)
                self.cache_hit, self.seconds, self._digest = False, self.seconds + time.perf_counter() - start, None
                self._data = _store(self._cache, spec, loaded)
            self._program = loaded
        return self._program

    @property
    def digest(self) -> str:
        """program_file.digest of the program, from its bytes when it has not been loaded."""
        if self._digest is None:
            self._digest = (program_file.digest_json(self._data) if self._data is not None
                            else program_file.digest(self.program))
        return self._digest


def _store(cache: ProgramCache | None, spec: TraceSpec, program: ExportedProgram) -> bytes | None:
    """Write a fresh trace to the cache; its bytes (for the digest), or None when it has none."""
    if cache is None:
        return None
    try:
        data = program_file.dumps(program)
    except program_file.ProgramError as exc:
        log.warning("could not write the trace cache (%s); continuing without it", exc)
        return None
    cache.store(spec.key(), spec.describe(), data)
    return data


def traced(spec: TraceSpec, use_cache: bool = True) -> TracedProgram:
    """The exported program for spec: from the trace cache when a sealed entry is there (see
    exporter.trace_cache; verified when first loaded), else traced now and stored. use_cache=False
    neither reads nor writes it."""
    start = time.perf_counter()
    # Parts are traced afresh: a part's trace takes seconds, against minutes for converting it, and the
    # cache's program check (program_file.verify) describes whole models.
    cache = ProgramCache.open() if use_cache and spec.layers is None else None
    if cache is not None:
        data = cache.read(spec.key(), spec.describe())
        if data is not None:
            return TracedProgram(spec, True, time.perf_counter() - start, data=data, cache=cache)
    program = trace(spec)
    seconds = time.perf_counter() - start
    return TracedProgram(spec, False, seconds, program=program, data=_store(cache, spec, program), cache=cache)


def save_program(program: ExportedProgram, path: Path) -> None:
    program_file.write_archive(program, path)


def trace_dtype(precision: str) -> str:
    """Float precisions trace in their own dtype; quantized ones trace fp32 and quantize weights."""
    return precision if precision in DTYPES else "fp32"


def bind(program: ExportedProgram, lookup: Callable[[str], torch.Tensor]) -> ExportedProgram:
    """Bind real weights by parameter name into the program (in place) and return it."""
    for name in list(program.state_dict):
        program.state_dict[name] = torch.nn.Parameter(lookup(name), requires_grad=False)
    return program
