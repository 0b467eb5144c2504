"""manifest.json: the self-description of an artifact, and its integrity check on load."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.checkpoint import sha256_file
from exporter.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def tool_versions(runtime_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"mistral_export": __version__, "python": platform.python_version(),
            "torch": package_version("torch"),
            **{name: package_version(name) for name in runtime_packages}}


def file_list(folder: Path) -> list[dict[str, Any]]:
    """Every file under folder except the manifest, with bytes and sha256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """(Re)write the manifest with a fresh file list; returns what was written."""
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "files": file_list(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Read an artifact's manifest; with verify, refuse missing, resized or altered files."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an artifact: {MANIFEST} not found")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {manifest.get('schema_version')}, this tool reads "
                            f"{SCHEMA_VERSION}; rebuild the artifact with this version")
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    problems = []
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest (file altered or corrupted)")
    if problems:
        raise ArtifactError(f"artifact {folder} fails its integrity check:\n  " + "\n  ".join(problems)
                            + "\nRebuild it with `mistral-export build ... --force`.")
