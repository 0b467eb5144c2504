"""What `--checkpoint` names: a Hugging Face folder, a Mistral download folder, or a hub id resolved in
the local Hugging Face cache. Nothing is ever fetched: a hub id that is not cached is an error."""

from __future__ import annotations

import os
import re
from pathlib import Path

from exporter.checkpoint import CheckpointFolder, PresetWeights, WeightSource
from exporter.consolidated import ConsolidatedFolder, is_consolidated
from exporter.errors import CheckpointError

# owner/name[@revision], as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def open_folder(folder: Path) -> CheckpointFolder:
    """A checkpoint folder in whichever format it is in."""
    return ConsolidatedFolder(folder) if is_consolidated(Path(folder)) else CheckpointFolder(folder)


def hub_cache() -> Path:
    """The cache huggingface_hub itself uses: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def from_hub_cache(repo: str) -> Path:
    """The snapshot folder of a cached hub repository (refs/<revision> -> snapshots/<sha>), offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    cache = hub_cache()
    try:
        # local_files_only: huggingface_hub resolves the ref in the cache and makes no request.
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise CheckpointError(
            f"{repo} is not a folder, and it is not in the local Hugging Face cache {cache} "
            f"(looked for models--{repo_id.replace('/', '--')}); nothing is downloaded here: fetch it first "
            f"with huggingface_hub's `hf download {repo_id}` (or point HF_HUB_CACHE at the cache that has "
            "it), or pass a local folder") from None


def open_source(checkpoint: Path | None, preset_name: str | None, adapter: Path | None = None) -> WeightSource:
    """The weight source the user named: a folder or a cached hub id wins over a preset; the default is
    the tiny preset. A folder that exists is always read as a folder, whatever its name. With an adapter,
    its LoRA is merged into each weight as the weight is read."""
    source = _base_source(checkpoint, preset_name)
    if adapter is None:
        return source
    from exporter.adapter import AdaptedWeights

    return AdaptedWeights(source, adapter)


def _base_source(checkpoint: Path | None, preset_name: str | None) -> WeightSource:
    if checkpoint is not None and preset_name is not None:
        raise CheckpointError("give either --checkpoint or --preset, not both")
    if checkpoint is None:
        return PresetWeights(preset_name or "tiny")
    if not checkpoint.exists() and _HUB_ID.match(str(checkpoint)):
        source = open_folder(from_hub_cache(str(checkpoint)))
        source.hub_id = str(checkpoint)
        source.name = str(checkpoint).partition("@")[0].split("/")[-1]  # not the snapshot's hash
        return source
    return open_folder(checkpoint)
