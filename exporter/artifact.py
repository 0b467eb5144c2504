"""Artifact folders: refused unless safe to write, staged beside the output, moved into place whole.

``--out`` is checked before any work: it may not be a symlink or a plain file, nor the root, home or
current folder or one containing them, nor the checkpoint or a folder containing it, and ``--force``
replaces only a folder that is one of our artifacts (it holds our manifest.json). While a build or a
validation writes an output, that path is locked, so a second writer fails at once instead of
replacing the first one's work.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from exporter import signals, staging
from exporter.errors import UserError
from exporter.manifest import MANIFEST, MAX_MANIFEST_BYTES, write_manifest


def is_artifact(folder: Path) -> bool:
    """Whether folder holds a manifest.json that mistral-export wrote (a JSON object naming the tool)."""
    path = folder / MANIFEST
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("tool"), dict) and "mistral_export" in data["tool"]


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out(out: Path, force: bool, protect: Sequence[Path] = ()) -> None:
    """Refuse, before any work and touching nothing, an output path a build must not write."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link{'' if out.exists() else ' to a missing path'}; "
                        "give the artifact folder's real path")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a folder; choose another --out")
    resolved = out.resolve()
    for place, what in ((Path("/"), "the root folder"), (Path.home(), "your home folder"),
                        (Path.cwd(), "the current folder")):
        if _contains(resolved, place.resolve()):
            raise UserError(f"--out {out} is {what} or contains it; choose a new folder for the artifact")
    for path in protect:
        if _contains(resolved, path.resolve()):
            raise UserError(f"--out {out} is the checkpoint {path} or contains it; choose another --out")
    if out.exists():
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it, or choose another --out")
        if not is_artifact(out):
            raise UserError(f"--force replaces only a mistral-export artifact (a folder holding its {MANIFEST}); "
                            f"{out} is not one, so nothing was touched; choose another --out")


def ensure_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out.parent}: {exc.strerror or exc}; choose a writable --out") from None
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder; choose another --out")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold out's lock (a second writer fails at once) after sweeping dead processes' leftovers."""
    ensure_parent(out)
    with staging.output_lock(out):
        staging.sweep_stale(out)
        yield


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A new staging folder that replaces out (atomically) when the block succeeds; on any failure or
    signal it is removed and out is untouched. The caller holds out's lock."""
    stage = staging.new_stage(out)
    try:
        yield stage
    except BaseException:
        with signals.deferred():
            staging.discard(stage)
        raise
    with signals.deferred() as pending:
        if pending():  # a signal came at the last moment: leave out as it was
            staging.discard(stage)
            return
        try:
            staging.publish(stage, out)
        except BaseException:  # the swap itself failed (disk full, EXDEV...): out is as it was
            staging.discard(stage)
            raise


@contextmanager
def staged(out: Path, force: bool, protect: Sequence[Path] = ()) -> Iterator[Path]:
    """A new artifact at out, whole or not at all (check_out says what is refused)."""
    out = Path(out)
    check_out(out, force, protect)
    with locked(out):
        check_out(out, force, protect)  # again under the lock: another process may have written it
        with replacing(out) as stage:
            yield stage


def rewrite(folder: Path, manifest: dict, write: Callable[[Path], None], drop: Collection[str]) -> dict:
    """Replace an artifact, atomically, by a copy in which write(stage) has added new files.

    Every listed file except those in drop is hard-linked into the copy (copied where a link is
    refused), so the copy costs no space; write() must create its files anew (never open a linked
    one for writing: it is the original's). The manifest is rewritten with the verified hashes of
    the linked files. The caller holds locked(folder). A failure or signal leaves the folder as it was."""
    known = {e["path"]: e for e in manifest["files"]}
    with replacing(folder) as stage:
        for rel in known:
            if rel in drop:
                continue
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(folder / rel, dest)
            except OSError:
                shutil.copy2(folder / rel, dest)
        write(stage)
        # Only the linked files keep their verified hashes: a rewritten one of the same size is new.
        written = write_manifest(stage, manifest, {rel: e for rel, e in known.items() if rel not in drop})
    return written


def write_new(path: Path, data: bytes | str) -> None:
    """Write a file as a new inode (temporary file, then rename): safe beside hard-linked files."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
