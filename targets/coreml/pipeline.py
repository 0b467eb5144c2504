"""How a Core ML artifact is laid out and driven: its parts (consecutive layer blocks, one mlpackage
each), its functions (prefill at a few enumerated chunk lengths, decode at 1), and the description of
both that the manifest carries for apps to follow.

Why parts: coremltools converts a whole in-memory torch program, so the export's peak memory grows with
the model; converting a block of layers at a time bounds it by the largest block. Why several prefill
lengths: each function has static shapes (which the Neural Engine needs), and a prompt pays for the
length of the function it runs through, so a 10-token prompt should not run a capacity-length one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from exporter.config import MistralConfig
from exporter.errors import ArtifactError, UserError
from exporter.manifest import listed_dir, listed_file
from exporter.model import parameter_shapes
from targets.resources import BASELINE_BYTES

SINGLE_FILE = "model.mlpackage"
# Where a saved mlpackage keeps its program and weights; read there directly (runner.load_mil_program).
PACKAGE_SPEC = "Data/com.apple.CoreML/model.mlmodel"
PACKAGE_WEIGHTS = "Data/com.apple.CoreML/weights"
DECODE = "decode"
# A part's hidden-state output; Core ML refuses a function whose input and output share a name.
HIDDEN_OUT = "hidden_out"
DEFAULT_PREFILL = "64,256,1024"
# Peak RSS of converting one part, per byte of that part's fp32 weights, on top of the process baseline,
# with a fifth of headroom over what benchmarks/export_memory.py measured on Mistral 7B v0.1 dims in 3
# parts (docs/benchmarks.md, Scale): fp16 0.62 (the bound fp16 weights plus coremltools' transients);
# compressed 1.12 (each function's weights are compressed before the functions share one copy). fp32
# binds fp32 weights and was not measured at 7B: it keeps the earlier provisional 1.5.
CONVERT_FACTOR = {"fp16": 0.75, "fp32": 1.5}
COMPRESSED_FACTOR = 1.35
# auto leaves a fifth of the available memory to everything else, as the matrix's default budget does.
AUTO_BUDGET = 0.8


def state_name(kind: str, layer: int) -> str:
    return f"{kind}_cache_{layer}"


def prefill_name(length: int) -> str:
    return f"prefill_{length}"


def prefill_lengths(text: str, capacity: int) -> tuple[int, ...]:
    """The prefill chunk lengths of `--option prefill_chunks=64,256,1024`, capped at the capacity."""
    try:
        asked = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"prefill_chunks={text!r} is not a comma-separated list of lengths, e.g. 64,256,1024") from None
    if not asked or any(n < 2 for n in asked):
        raise UserError(f"prefill_chunks={text!r}: give lengths of at least 2 (one token runs through decode), "
                        "e.g. 64,256,1024")
    return tuple(sorted({min(n, capacity) for n in asked}))


def schedule(tokens: int, lengths: tuple[int, ...]) -> Iterator[tuple[str, int, int]]:
    """(function, its chunk length, real tokens) for a chunk of `tokens`: pieces of the largest prefill
    length while more remain than it holds, then the smallest function that holds the rest."""
    largest = lengths[-1]
    while tokens > largest:
        yield prefill_name(largest), largest, largest
        tokens -= largest
    if tokens == 1:
        yield DECODE, 1, 1
    elif tokens > 1:
        length = next(n for n in lengths if n >= tokens)
        yield prefill_name(length), length, tokens


def part_fp32_bytes(cfg: MistralConfig, start: int, end: int) -> int:
    """fp32 weight bytes of the part holding layers [start, end)."""
    return 4 * sum(torch.Size(shape).numel() for shape in parameter_shapes(cfg, (start, end)).values())


def split_layers(layers: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive [start, end) blocks of as equal a layer count as possible."""
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def conversion_bytes(cfg: MistralConfig, parts: list[tuple[int, int]], precision: str) -> int:
    """Expected peak RSS of converting these parts one after another: the largest part's."""
    factor = CONVERT_FACTOR.get(precision, COMPRESSED_FACTOR)
    return int(BASELINE_BYTES + factor * max(part_fp32_bytes(cfg, a, b) for a, b in parts))


def plan_parts(cfg: MistralConfig, chunks: str, precision: str,
               available: int | None = None) -> list[tuple[int, int]]:
    """The parts for `--option chunks=N|auto`. auto: the fewest whose largest part converts within the
    available memory (one part for small models), by the measured conversion factor."""
    layers = cfg.num_hidden_layers
    if chunks != "auto":
        try:
            count = int(chunks)
        except ValueError:
            raise UserError(f"chunks={chunks!r} is neither a number of parts nor auto") from None
        if not 1 <= count <= layers:
            raise UserError(f"chunks={count}: the model has {layers} layers, so give 1 to {layers} parts (or auto)")
        return split_layers(layers, count)
    budget = AUTO_BUDGET * (psutil.virtual_memory().available if available is None else available)
    for count in range(1, layers + 1):
        if conversion_bytes(cfg, split_layers(layers, count), precision) <= budget:
            return split_layers(layers, count)
    need = conversion_bytes(cfg, split_layers(layers, layers), precision)
    raise UserError(f"even one layer per part needs about {need / 2**30:.1f} GiB to convert and "
                    f"{budget / 2**30:.1f} GiB is available; free memory or build on a larger machine")


class PartsMemory:
    """The export-memory declaration (targets/resources.py) of a build in parts: chunks=auto adapts to
    the memory a node has, so a job needs at least what one layer per part takes to convert."""

    def bytes(self, cfg: MistralConfig, precision: str) -> int:
        return conversion_bytes(cfg, split_layers(cfg.num_hidden_layers, cfg.num_hidden_layers), precision)


def part_file(index: int, count: int) -> str:
    return SINGLE_FILE if count == 1 else f"part_{index}.mlpackage"


def describe(cfg: MistralConfig, parts: list[tuple[int, int]], lengths: tuple[int, ...]) -> dict[str, Any]:
    """The manifest's pipeline: run the parts in order, each with its own states, through one function
    name at a time (all parts have the same functions); a part's output is the next part's input."""
    functions = {prefill_name(n): n for n in lengths} | {DECODE: 1}
    described = []
    for i, (start, end) in enumerate(parts):
        first, last = start == 0, end == cfg.num_hidden_layers
        inputs = [{"name": "input_ids", "dtype": "int32", "shape": [1, "T"]} if first else
                  {"name": "hidden", "dtype": "float32", "shape": [1, "T", cfg.hidden_size]},
                  {"name": "positions", "dtype": "int32", "shape": [1, "T"]}]
        output = ({"name": "logits", "dtype": "float32", "shape": [1, "T", cfg.vocab_size]} if last else
                  {"name": HIDDEN_OUT, "dtype": "float32", "shape": [1, "T", cfg.hidden_size]})
        described.append({"file": part_file(i, len(parts)), "layers": [start, end], "inputs": inputs,
                          "outputs": [output], "states": [state_name(k, j) for j in range(start, end) for k in "kv"]})
    return {"parts": described, "functions": functions, "default_function": DECODE,
            "padding": "a chunk shorter than its function is padded with position -1 (input id 0)"}


_IO = {"type": "object", "required": ["name", "dtype", "shape"], "additionalProperties": False,
       "properties": {"name": {"enum": ["input_ids", "hidden", "positions", "logits", HIDDEN_OUT]},
                      "dtype": {"enum": ["int32", "float32"]},
                      "shape": {"type": "array", "items": {"type": ["integer", "string"]}}}}

# JSON Schema of manifest.target.pipeline (tests check every build against it; `check` below adds what
# a schema cannot say: the parts cover the layers in order and the files stay inside the artifact).
PIPELINE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["parts", "functions", "default_function"],
    "properties": {
        "parts": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["file", "layers", "inputs", "outputs", "states"],
            "additionalProperties": False,
            "properties": {"file": {"type": "string", "pattern": r"^[A-Za-z0-9_]+\.mlpackage$"},
                           "layers": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                      "minItems": 2, "maxItems": 2},
                           "inputs": {"type": "array", "items": _IO, "minItems": 2, "maxItems": 2},
                           "outputs": {"type": "array", "items": _IO, "minItems": 1, "maxItems": 1},
                           "states": {"type": "array", "items": {"type": "string",
                                                                 "pattern": "^[kv]_cache_[0-9]+$"}}}}},
        "functions": {"type": "object", "minProperties": 2,
                      "additionalProperties": {"type": "integer", "minimum": 1},
                      "propertyNames": {"pattern": "^(decode|prefill_[0-9]+)$"}},
        "default_function": {"const": DECODE},
        "padding": {"type": "string"},
    },
}


@dataclass(frozen=True)
class Part:
    path: Path
    start: int
    end: int
    input: str
    output: str
    states: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    parts: tuple[Part, ...]
    lengths: tuple[int, ...]  # prefill chunk lengths, ascending

    @property
    def functions(self) -> tuple[str, ...]:
        return (*(prefill_name(n) for n in self.lengths), DECODE)


def load(artifact: Path, manifest: dict[str, Any]) -> Pipeline:
    """The artifact's pipeline, checked: parts cover the layers in order, each a listed folder of the
    artifact whose program and weights are listed files, each function a prefill length or decode, states named for the part's own layers."""
    desc = manifest["target"].get("pipeline")
    layers = manifest["model"]["config"]["num_hidden_layers"]
    where = f"artifact {artifact}: manifest.target.pipeline"
    if not isinstance(desc, dict):
        raise ArtifactError(f"{where} is missing (built by an older version?); rebuild the artifact")
    try:
        functions = dict(desc["functions"])
        lengths = tuple(sorted(int(name.removeprefix("prefill_")) for name in functions if name != DECODE))
        if functions.get(DECODE) != 1 or not lengths or any(functions[prefill_name(n)] != n for n in lengths):
            raise ValueError("functions are not decode at 1 and prefill_<n> at n")
        parts, expect = [], 0
        for i, entry in enumerate(desc["parts"]):
            start, end = (int(v) for v in entry["layers"])
            if start != expect or end <= start or end > layers:
                raise ValueError(f"part {i} holds layers [{start}, {end}), expected to start at {expect}")
            states = tuple(str(s) for s in entry["states"])
            if sorted(states) != sorted(state_name(k, j) for j in range(start, end) for k in "kv"):
                raise ValueError(f"part {i} states {list(states)[:2]}... are not its layers' caches")
            first, last = str(entry["inputs"][0]["name"]), str(entry["outputs"][0]["name"])
            if first != ("input_ids" if start == 0 else "hidden") or last != ("logits" if end == layers else HIDDEN_OUT):
                raise ValueError(f"part {i} maps {first} to {last}")
            package = listed_dir(artifact, manifest, entry["file"])
            listed_file(artifact, manifest, f"{entry['file']}/{PACKAGE_SPEC}")
            listed_dir(artifact, manifest, f"{entry['file']}/{PACKAGE_WEIGHTS}")
            parts.append(Part(package, start, end, first, last, states))
            expect = end
        if expect != layers:
            raise ValueError(f"the parts end at layer {expect} of {layers}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where} is not valid ({exc}); rebuild the artifact") from None
    return Pipeline(tuple(parts), lengths)
