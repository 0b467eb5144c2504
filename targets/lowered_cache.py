"""Weight-free lowered graphs, cached by everything they depend on; shared by the targets that cache one.

Translating the program into a runtime's graph and running its passes take most of a build, and none
of it depends on the weights. A target keeps the graph as it stands before the weights are bound:
``<key>.<suffix>`` (the graph, in the runtime's own data format, never code) and ``<key>.meta.json``
(its sha256, the spec and what the target records beside it). The spec holds the program's content
hash, the settings of the passes and the versions of the tool, torch, the runtime and the target's
own source, so a change to any of them misses.

The integrity rules are the trace cache's (exporter.trace_cache): a private folder, files owned by this
user and writable by nobody else, the hash and the spec must match. Anything else is a miss with one
warning; a failed write is one warning and never fails a build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from exporter import __version__
from exporter.trace_cache import UnsafeCache, read_entry, runtime_cache, write_entry

MAX_SIDECAR_BYTES = 4 << 20
_LENGTH = struct.Struct("<Q")  # each file's length, before its bytes (pack_files)
log = logging.getLogger("mistral_export")
T = TypeVar("T")


def pack_files(files: Sequence[bytes]) -> bytes:
    """Several files as one payload (a graph and its constants, a set of IRs), each after its length."""
    return b"".join(_LENGTH.pack(len(data)) + data for data in files)


def unpack_files(data: bytes, count: int) -> list[bytes]:
    """The `count` files of a pack_files payload; UnsafeCache if it is cut short or runs on past them."""
    files, at = [], 0
    for _ in range(count):
        if at + _LENGTH.size > len(data):
            raise UnsafeCache("is truncated")
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if size > len(data) - at:
            raise UnsafeCache("is truncated")
        files.append(data[at:at + size])
        at += size
    if at != len(data):
        raise UnsafeCache("has trailing bytes")
    return files


def source_hash(package: Path) -> str:
    """The target's own translation and passes: a change to any file of its package must miss."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def lowered_spec(program_digest: str, settings: dict[str, Any], package: Path,
                 versions: dict[str, str]) -> dict[str, Any]:
    """Everything a lowered graph depends on: the program, the pass settings, the versions."""
    return {"program": program_digest, "settings": settings, "tool": __version__, "torch": torch.__version__,
            **versions, "passes": source_hash(package)}


@dataclass(frozen=True)
class LoweredCache:
    """One target's folder of the cache root: entries of one format, each at most `limit` bytes."""

    folder: Path
    fmt: str
    suffix: str
    limit: int

    @staticmethod
    def open(name: str, fmt: str, suffix: str, limit: int) -> LoweredCache | None:
        """The cache, or None when caching is off or its folder is not safe (runtime_cache warns)."""
        folder = runtime_cache(name)
        return None if folder is None else LoweredCache(folder, fmt, suffix, limit)

    def _paths(self, spec: dict[str, Any]) -> tuple[Path, Path]:
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / f"{key}.{self.suffix}", self.folder / f"{key}.meta.json"

    def load(self, spec: dict[str, Any], decode: Callable[[dict[str, Any], bytes], T]) -> T | None:
        """decode(sidecar, payload) of the entry for spec, both checked; None if there is none, or (with
        one warning) if it fails a check or cannot be decoded."""
        payload, sidecar = self._paths(spec)
        if not payload.exists() and not sidecar.exists():
            return None
        try:
            meta, data = read_entry(payload, sidecar, self.fmt, spec, self.limit, MAX_SIDECAR_BYTES)
            return decode(meta, data)
        except Exception as exc:  # noqa: BLE001 - an entry that cannot be read or decoded is a miss
            log.warning("graph cache entry %s %s; lowering afresh", payload.name, exc)
            return None

    def write(self, spec: dict[str, Any], data: bytes, meta: dict[str, Any]) -> None:
        """Write the entry (payload, then sidecar); a failure is one warning."""
        payload, sidecar = self._paths(spec)
        try:
            write_entry(payload, sidecar, data, {"format": self.fmt, "spec": spec, **meta})
        except (OSError, ValueError) as exc:
            log.warning("could not write the graph cache in %s (%s); continuing without it", self.folder,
                        getattr(exc, "strerror", None) or exc)
