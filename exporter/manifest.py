"""manifest.json: the self-description of an artifact, and its integrity check on load.

Reading is strict, because an artifact may come from anyone: the manifest must be a UTF-8 JSON object
with the fields a runner needs; every file it lists is a relative path inside the artifact with no
symbolic link on the way, a size and a sha256; and every file on disk is listed. Anything else is
refused before any file is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import stat
from collections.abc import Collection, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

from exporter import __version__
from exporter.checkpoint import sha256_file
from exporter.config import MistralConfig
from exporter.errors import ArtifactError, ConfigError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def tool_versions(runtime_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"mistral_export": __version__, "python": platform.python_version(),
            "torch": package_version("torch"),
            **{name: package_version(name) for name in runtime_packages}}


def artifact_id(manifest: Mapping[str, Any], exclude: Collection[str] = ()) -> str:
    """The artifact's identity: sha256 over its listed files' paths and hashes (those in exclude,
    such as the reports a validation run rewrites, left out), so that the same artifact validated
    on two machines has one id."""
    files = sorted([f["path"], f["sha256"]] for f in manifest["files"] if f["path"] not in exclude)
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def json_safe(value: Any) -> Any:
    """inf and nan are not JSON: written as the strings "inf", "-inf", "nan" so files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON (never NaN or Infinity), indented, with a final newline."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def _disk_files(folder: Path) -> list[str]:
    """Every file under folder (relative, POSIX), refusing symbolic links and special files."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise ArtifactError(f"artifact {folder}: {rel} is a symbolic link; artifacts hold plain files only")
            if name in files and not stat.S_ISREG(info.st_mode):
                raise ArtifactError(f"artifact {folder}: {rel} is not a regular file")
            if name in files:
                found.append(rel)
    return sorted(found)


def file_list(folder: Path, known: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every file under folder except the manifest, with bytes and sha256. `known` entries (from a
    manifest just verified) are reused for files of the same size instead of hashing them again."""
    entries = []
    for rel in _disk_files(folder):
        if rel == MANIFEST:
            continue
        size = (folder / rel).stat().st_size
        old = (known or {}).get(rel)
        digest = old["sha256"] if old is not None and old["bytes"] == size else sha256_file(folder / rel)
        entries.append({"path": rel, "bytes": size, "sha256": digest})
    return entries


def write_manifest(folder: Path, manifest: dict[str, Any],
                   known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """(Re)write the manifest with a fresh file list; returns what was written."""
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "files": file_list(folder, known)}
    (folder / MANIFEST).write_text(dumps(manifest), encoding="utf-8")
    return json_safe(manifest)


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ArtifactError(f"{where}.{key} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def check_structure(manifest: Any, path: Path) -> dict[str, Any]:
    """The fields every consumer reads, with their types; raises ArtifactError naming the first problem."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object; rebuild the artifact")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {manifest.get('schema_version')!r}, this tool reads "
                            f"{SCHEMA_VERSION}; rebuild the artifact with this version")
    try:
        files = _need(manifest, "files", list, "manifest")
        if not files:
            raise ArtifactError("manifest.files is empty")
        for entry in files:
            if not isinstance(entry, dict):
                raise ArtifactError("manifest.files holds an entry that is not an object")
            name = entry.get("path")
            _need(entry, "path", str, "manifest.files[]")
            _need(entry, "bytes", int, f"manifest.files[{name}]")
            if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
                raise ArtifactError(f"manifest.files[{name}] has no sha256")
        target = _need(manifest, "target", dict, "manifest")
        for key in ("name", "device", "precision"):
            _need(target, key, str, "manifest.target")
        _need(target, "options", dict, "manifest.target")
        cache = _need(manifest, "cache", dict, "manifest")
        if _need(cache, "capacity", int, "manifest.cache") < 1:
            raise ArtifactError("manifest.cache.capacity must be positive")
        model = _need(manifest, "model", dict, "manifest")
        MistralConfig(**_need(model, "config", dict, "manifest.model"))
        _need(manifest, "tool", dict, "manifest")
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}; rebuild the artifact") from None
    except (TypeError, ConfigError) as exc:
        raise ArtifactError(f"{path}: manifest.model.config is not a valid config ({exc}); rebuild the artifact") from None
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Read an artifact's manifest; with verify, refuse escaping, missing, unlisted, resized or altered files."""
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{folder} is not an artifact: {MANIFEST} not found (or not a plain file)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is {path.stat().st_size} bytes, too large for a manifest; rebuild the artifact")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text; rebuild the artifact") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from None
    check_structure(manifest, path)
    if verify:
        verify_files(folder, manifest)
    return manifest


def inside(folder: Path, rel: object) -> Path:
    """folder/rel for a manifest path that is relative, has no '..', and crosses no symbolic link."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"artifact {folder}: path {rel!r} in the manifest is not a plain relative path")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(p in ("..", ".") for p in parts) or rel != "/".join(parts):
        raise ArtifactError(f"artifact {folder}: path {rel!r} in the manifest leaves the artifact; refused")
    current = folder
    for i, part in enumerate(parts):
        current = current / part
        if current.is_symlink():
            how = "is a symbolic link" if i == len(parts) - 1 else "goes through a symbolic link"
            raise ArtifactError(f"artifact {folder}: {rel} {how}; artifacts hold plain files only, refused")
    return current


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file inside the artifact with its size and sha256, and no file that is not listed."""
    listed = {}
    for entry in manifest["files"]:
        inside(folder, entry["path"])
        listed[entry["path"]] = entry
    on_disk = [rel for rel in _disk_files(folder) if rel != MANIFEST]
    unlisted = [rel for rel in on_disk if rel not in listed]
    if unlisted:
        raise ArtifactError(f"artifact {folder} holds {unlisted[0]}, which its manifest does not list "
                            f"({len(unlisted)} such file(s)); remove it or rebuild the artifact")
    problems = []
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file altered or corrupted)")
    if problems:
        raise ArtifactError(f"artifact {folder} fails its integrity check: " + "; ".join(problems[:5])
                            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                            + ". Rebuild it with `mistral-export build ... --force`")


def listed_file(folder: Path, manifest: dict[str, Any], rel: object) -> Path:
    """A path a manifest field names (a model file), which must be one of the verified, listed files."""
    path = inside(folder, rel)
    if rel not in {e["path"] for e in manifest["files"]}:
        raise ArtifactError(f"artifact {folder}: {rel!r} is named by the manifest but not among its files")
    return path


def listed_dir(folder: Path, manifest: dict[str, Any], rel: object) -> Path:
    """A folder a manifest field names (the tokenizer), which must hold listed files only."""
    path = inside(folder, rel)
    if not any(e["path"].startswith(f"{rel}/") for e in manifest["files"]):
        raise ArtifactError(f"artifact {folder}: folder {rel!r} named by the manifest holds no listed file")
    return path
