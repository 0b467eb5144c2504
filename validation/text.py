"""Tokenizer access for artifacts that carry one (local files only; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.errors import ArtifactError


def load_tokenizer(folder: Path) -> Any:
    """A transformers tokenizer from the artifact's tokenizer/ folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the tokenizer in {folder}: {exc}") from None
