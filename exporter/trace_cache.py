"""The trace cache: weight-free programs by content key, trusted only when this user wrote them.

An entry is two files in a folder only its owner can write: ``<key>.program.json`` (the graph JSON of
exporter.program_file, never unpickled) and ``<key>.meta.json`` (its sha256 and the spec it was
traced from). An entry is used only when both files are regular files owned by this user and not
writable by others, the hash matches, the recorded spec is this spec, and the loaded program passes
``program_file.verify``. Anything else is a miss: one warning line, then a fresh trace.

The cache is an optimisation and never fails a build: an unwritable, full or foreign cache folder
means tracing without it, and a failed write leaves no partial file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from exporter import program_file

FORMAT = "mistral-export/program-cache"
FORMAT_VERSION = 1
MAX_SIDECAR_BYTES = 1 << 20
log = logging.getLogger("mistral_export")


# --no-cache holds for every stage: the runtimes' compiled-model caches consult this too.
_ENABLED: ContextVar[bool] = ContextVar("mistral_export_cache_enabled", default=True)


def cache_root() -> Path:
    return Path(os.environ.get("MISTRAL_EXPORT_CACHE", Path.home() / ".cache" / "mistral-export"))


@contextmanager
def caching(enabled: bool) -> Iterator[None]:
    """Within the block, caches are used only if enabled (and never if an outer block disabled them)."""
    token = _ENABLED.set(enabled and _ENABLED.get())
    try:
        yield
    finally:
        _ENABLED.reset(token)


def runtime_cache(name: str) -> Path | None:
    """A private folder for a runtime's own cache (OpenVINO's compiled blobs), or None when caching is
    off or the folder is not safe; a runtime trusts what it finds there, so it must be ours."""
    if not _ENABLED.get():
        return None
    try:
        private_dir(cache_root())
        return private_dir(cache_root() / name)
    except UnsafeCache as exc:
        log.warning("%s cache disabled: %s", name, exc)
        return None


class UnsafeCache(Exception):
    """A cache folder or entry that someone else could have written, or that is not what it claims."""


def private_dir(path: Path) -> Path:
    """path as a folder (created 0700 if missing) that only this user can write, or UnsafeCache."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
        parent = path.parent.stat()
    except OSError as exc:
        raise UnsafeCache(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCache(f"{path} is not a folder (a symlink or a file)")
    if info.st_uid != os.geteuid():
        raise UnsafeCache(f"{path} is owned by uid {info.st_uid}, not by this user")
    if info.st_mode & 0o022:
        raise UnsafeCache(f"{path} is writable by other users (mode {stat.filemode(info.st_mode)})")
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX and parent.st_uid != os.geteuid():
        raise UnsafeCache(f"{path.parent} lets any user replace {path.name} (world-writable, no sticky bit)")
    return path


def read_owned(path: Path, limit: int) -> bytes:
    """A regular file owned by this user, writable by nobody else, at most `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise UnsafeCache(f"cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeCache("is not a regular file")
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise UnsafeCache("was not written by this user (owner or mode)")
        if info.st_size > limit:
            raise UnsafeCache(f"is {info.st_size} bytes, more than a cache entry can be")
        return fh.read()


def read_entry(payload: Path, sidecar: Path, fmt: str, spec: dict[str, Any], payload_limit: int,
               sidecar_limit: int = MAX_SIDECAR_BYTES) -> tuple[dict[str, Any], bytes]:
    """A cache entry's sidecar and payload, both this user's, written for this spec, the payload matching
    the sha256 its sidecar records; UnsafeCache (or ValueError for malformed JSON) otherwise."""
    meta = json.loads(read_owned(sidecar, sidecar_limit))
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("spec") != spec:
        raise UnsafeCache("was written for another spec")
    data = read_owned(payload, payload_limit)
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise UnsafeCache("does not match the sha256 its sidecar records")
    return meta, data


def write_entry(payload: Path, sidecar: Path, data: bytes, meta: dict[str, Any]) -> None:
    """Write the payload, then its sidecar (meta plus the payload's size and sha256), each atomically."""
    meta = {**meta, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(payload.parent, payload.name, data)
    write_atomic(sidecar.parent, sidecar.name, json.dumps(meta, sort_keys=True).encode())


def write_atomic(folder: Path, name: str, data: bytes) -> None:
    """Write folder/name via a temporary file and a rename; the temporary is removed on any failure."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ProgramCache:
    """The programs folder of the cache root."""

    folder: Path

    @staticmethod
    def open() -> ProgramCache | None:
        """The cache, or None when caching is off, or (with one warning) when its folder is not safe."""
        if not _ENABLED.get():
            return None
        try:
            private_dir(cache_root())
            return ProgramCache(private_dir(cache_root() / "programs"))
        except UnsafeCache as exc:
            log.warning("trace cache disabled: %s; tracing without it", exc)
            return None

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.program.json", self.folder / f"{key}.meta.json"

    def read(self, key: str, spec: dict[str, Any]) -> bytes | None:
        """The program bytes cached under key when the entry is this user's, sealed and written for
        this spec, else None (a miss). The program itself is checked where it is loaded (load)."""
        graph, sidecar = self._paths(key)
        if not graph.exists() and not sidecar.exists():
            return None
        try:
            return read_entry(graph, sidecar, FORMAT, spec, program_file.MAX_PROGRAM_BYTES)[1]
        except (UnsafeCache, ValueError) as exc:
            log.warning("trace cache entry %s %s; tracing afresh", graph.name, exc)
            return None

    def load(self, key: str, data: bytes, config: Any, capacity: int, dtype: torch.dtype) -> ExportedProgram | None:
        """The program of read() bytes, verified against the config (program_file.verify), or None."""
        try:
            program = program_file.loads(data, config, dtype)
            program_file.verify(program, config, capacity, dtype)
            return program
        except program_file.ProgramError as exc:
            log.warning("trace cache entry %s %s; tracing afresh", self._paths(key)[0].name, exc)
            return None

    def store(self, key: str, spec: dict[str, Any], data: bytes) -> None:
        """Write the entry (program bytes of program_file.dumps, then sidecar); a failure is one
        warning, never an error."""
        graph, sidecar = self._paths(key)
        try:
            write_entry(graph, sidecar, data, {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec})
        except OSError as exc:
            log.warning("could not write the trace cache in %s (%s); continuing without it", self.folder,
                        exc.strerror or exc)
