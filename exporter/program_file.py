"""Exported programs on disk without pickle, and the check that a loaded program is the one expected.

``torch.export.load`` unpickles parts of a ``.pt2`` archive (pickled weights, constants, custom
objects, example inputs; some with ``weights_only=False``), so a crafted file runs code when loaded.
Our programs carry no weights (zero-stride placeholders) and no constants, so the graph alone (the
JSON that ``torch._export.serde`` writes) describes them. Loading reads only that JSON and rebuilds
the placeholders from the expected config; nothing is unpickled, whatever the file holds.

``verify`` then compares the program with the spec it should have been traced from: parameter names,
shapes and dtypes, the cache inputs, and the window of every attention node. A program of another
config (or a hand-edited one) is refused instead of run.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from exporter.attention import CACHED_ATTENTION_OP
from exporter.config import MistralConfig
from exporter.model import parameter_shapes

MAX_PROGRAM_BYTES = 256 << 20  # far above any real graph (Mistral 7B: about 3 MB); bounds a hostile read


class ProgramError(Exception):
    """A program file that cannot be read, or that is not the expected program."""


def _stubs(config: MistralConfig, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    return {name: torch.nn.Parameter(torch.zeros(1, dtype=dtype).expand(shape), requires_grad=False)
            for name, shape in parameter_shapes(config).items()}


def dumps(program: ExportedProgram) -> bytes:
    """The program's graph as torch.export's serialized JSON (no weights, no pickle)."""
    from torch._export.serde.serialize import serialize

    if program.constants:
        raise ProgramError(f"program holds constants {sorted(program.constants)[:3]}: they would need pickle")
    return serialize(program).exported_program


def digest(program: ExportedProgram) -> str:
    """A content hash of the program's computation (see digest_json)."""
    return digest_json(dumps(program))


def digest_json(data: bytes) -> str:
    """The content hash of dumps() bytes, without the storage offsets of fake-tensor metadata (a
    reloaded program records 0 where a fresh trace records a view's offset; lowering never reads them).
    Equal for a fresh trace, its trace-cache bytes and the program loaded from them."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "storage_offset"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    canonical = json.dumps(strip(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:20]


def loads(data: bytes, config: MistralConfig, dtype: torch.dtype) -> ExportedProgram:
    """Rebuild a program from dumps() bytes, with zero-stride placeholders for its weights."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    try:
        serialized = _bytes_to_dataclass(schema.ExportedProgram, data)
        return ExportedProgramDeserializer().deserialize(serialized, _stubs(config, dtype), {}, None)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a program we can use"
        raise ProgramError(f"not a readable exported program ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_archive_graph(path: Path) -> bytes:
    """The graph JSON of a torch.export .pt2 archive, read with zipfile only (no entry is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            models = [i for i in archive.infolist() if i.filename.split("/")[-2:-1] == ["models"]
                      and i.filename.endswith(".json")]
            if len(models) != 1:
                raise ProgramError(f"{path.name} holds {len(models)} programs, expected one")
            if models[0].file_size > MAX_PROGRAM_BYTES:
                raise ProgramError(f"{path.name}: program entry of {models[0].file_size} bytes is implausibly large")
            return archive.read(models[0])
    except (zipfile.BadZipFile, OSError) as exc:
        raise ProgramError(f"{path.name} is not a readable .pt2 archive ({exc})") from None


def verify(program: ExportedProgram, config: MistralConfig, capacity: int, dtype: torch.dtype) -> None:
    """Raise ProgramError unless the program is the canonical model of config at this capacity/dtype."""
    expected = parameter_shapes(config)
    problems: list[str] = []
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    params = {s.target: s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    if set(params) - set(expected):
        problems.append(f"unexpected parameters {sorted(set(params) - set(expected))[:3]}")
    for name, arg in params.items():
        val = placeholders[arg].meta.get("val")
        if name in expected and (val is None or tuple(val.shape) != expected[name] or val.dtype != dtype):
            problems.append(f"parameter {name}: {None if val is None else (tuple(val.shape), val.dtype)}, "
                            f"expected {(expected[name], dtype)}")
    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    layers = config.num_hidden_layers
    want = ["input_ids", "positions"] + [f"{k}_caches_{i}" for k in "kv" for i in range(layers)]
    if users != want:
        problems.append(f"inputs {users[:4]}..., expected {want[:4]}...")
    else:
        cache_shape = (config.num_key_value_heads, capacity, config.head_dim)
        for name in want[2:]:
            val = placeholders[name].meta.get("val")
            if val is None or tuple(val.shape[1:]) != cache_shape or val.dtype != dtype:
                problems.append(f"cache input {name}: {None if val is None else tuple(val.shape)}, "
                                f"expected [batch, {', '.join(map(str, cache_shape))}] {dtype}")
    window = config.sliding_window or 0
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and n.target == CACHED_ATTENTION_OP]
    if len(nodes) != layers:
        problems.append(f"{len(nodes)} attention nodes, expected {layers}")
    windows = sorted({n.args[6] for n in nodes if len(n.args) > 6})
    if windows and windows != [window]:
        problems.append(f"attention window {windows}, expected {window}")
    if problems:
        raise ProgramError("; ".join(problems[:5]))


def write_archive(program: ExportedProgram, path: Path) -> None:
    """A standard torch.export .pt2 (for consumers of the artifact); we read it back with read_archive."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found")  # our zero-stride stubs
        torch.export.save(program, path)


def read_archive(path: Path, config: MistralConfig, capacity: int, dtype: torch.dtype) -> ExportedProgram:
    """A .pt2 written by write_archive, loaded without pickle and verified against the config."""
    program = loads(read_archive_graph(path), config, dtype)
    verify(program, config, capacity, dtype)
    return program
