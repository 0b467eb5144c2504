"""Artifact folders: staged in a temporary sibling folder and moved into place whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import UserError


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out`, on any failure
    (Ctrl-C included) it is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / "old")
        os.replace(stage, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(stage, out)
