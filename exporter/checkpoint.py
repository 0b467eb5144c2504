"""Weight sources: a local Hugging Face folder (memory-mapped safetensors) or a seeded preset.

Both hand out one tensor at a time, so a target can stream weights into its own format without
ever holding the whole model twice. Nothing is fetched from a hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from exporter.config import MistralConfig, load_config, preset
from exporter.errors import CheckpointError
from exporter.model import parameter_shapes
from exporter.tokenizer import PRESET_TOKENIZERS, SPM_FILE, identify, packaged, version_of, write_hf_files

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "chat_template.jinja")
# Old checkpoints carry RoPE's inverse frequencies as a buffer; we recompute them.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX = "model.safetensors.index.json"
log = logging.getLogger("mistral_export")


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open, with a broken file (truncated, oversized header, data past the end) reported as a
    CheckpointError that names it."""
    try:
        with safe_open(path, framework="pt") as fh:
            yield fh
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-download or "
                              "re-convert this shard") from None


def _finite_extremes(tensor: torch.Tensor) -> bool:
    # aminmax propagates NaN and Inf in one pass without a mask copy: about 40x faster than
    # isfinite().all(), which was a fifth of a cached build's wall time.
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def finite(name: str, tensor: torch.Tensor, where: Path | str) -> torch.Tensor:
    """The tensor, unless it holds NaN or Inf: such a checkpoint would export silently and run as zeros."""
    if tensor.is_floating_point() and tensor.numel() and not _finite_extremes(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"tensor {name} in {where} holds {bad} NaN/Inf value(s); the checkpoint is "
                              "corrupt or was saved after a diverged step: use a finite checkpoint")
    return tensor


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when it is absent or not an object (the tokenizer loader reports it)."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def expected_shapes(cfg: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes a checkpoint of cfg holds (a tied lm_head is not stored)."""
    shapes = parameter_shapes(cfg)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass(frozen=True)
class FileRecord:
    """A checkpoint file with its size and sha256, as the manifest records it."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


class WeightSource:
    """Config plus a name -> tensor lookup; subclasses say where tensors come from."""

    name: str
    config: MistralConfig
    format = "preset"
    folder: Path | None = None  # where the files are, for sources read from disk
    hub_id: str | None = None  # the hub id it was resolved from in the local cache, if any
    tokenizer_dir: Path | None = None
    adapter: Any = None  # the LoRA adapter merged into the weights (exporter.adapter.AdaptedWeights)

    def origin(self) -> WeightSource:
        """The checkpoint itself, without any adapter merged in."""
        return self

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.config)

    def tensor(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The named tensor converted to dtype; None keeps the stored dtype (no conversion copy)."""
        raise NotImplementedError

    def parameter(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """A canonical parameter by name; a tied lm_head resolves to the embedding."""
        return self.tensor(self._stored_name(name), dtype)

    def rows(self, name: str) -> Rows:
        """A canonical parameter to read in blocks of rows, in its stored dtype."""
        return Rows(self, self._stored_name(name))

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a stored tensor; sources that can read a slice alone override this."""
        return self.tensor(name, None)[start:stop]

    def _stored_name(self, name: str) -> str:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes():
            yield name, self.tensor(name, dtype)

    def file_records(self) -> list[FileRecord]:
        return []

    def write_tokenizer(self, dest: Path) -> dict[str, Any] | None:
        """The source's tokenizer files into dest (created), and what they are; None when it has none."""
        if self.tokenizer_dir is None:
            return None
        dest.mkdir()
        for name in TOKENIZER_FILES:
            if (self.tokenizer_dir / name).is_file():
                shutil.copy2(self.inside(self.tokenizer_dir / name), dest / name)
        known = identify(dest / SPM_FILE) if (dest / SPM_FILE).is_file() else None
        return {"kind": "copied", "mistral_common_file": known,
                "instruct_version": version_of(known) if known else None,
                "chat_template": "chat_template" in _json_or_empty(dest / "tokenizer_config.json")
                or (dest / "chat_template.jinja").is_file()}

    def inside(self, path: Path) -> Path:
        """path, refused when a symbolic link takes it out of the checkpoint: its tokenizer files are copied
        into the artifact byte for byte, so a link to any other file would ship that file. A hub snapshot's
        links into its own repository's blobs stay inside."""
        root = self.folder.resolve() if self.folder is not None else None
        if root is not None and self.hub_id is not None:
            root = root.parent.parent  # models--owner--name/snapshots/<sha> -> models--owner--name
        target = path.resolve()
        if root is None or not target.is_relative_to(root):
            raise CheckpointError(f"{path} is a symbolic link to {target}, outside the checkpoint {root}; "
                                  "copy the file itself into the folder")
        return path

    def fingerprint(self) -> str:
        """Content identity: hashes of the files, or the preset name and seed."""
        return hashlib.sha256(json.dumps([r.to_dict() for r in self.file_records()]).encode()).hexdigest()


@dataclass(frozen=True)
class Rows:
    """A weight read block by block (``rows[a:b]``), so a converter never holds it whole."""

    source: WeightSource
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shapes()[self.name]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self.source.row_block(self.name, start, stop)


class PresetWeights(WeightSource):
    """Seeded random weights of a named preset; each tensor is generated on its own from its name."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.config = preset(name)
        self.seed = seed

    def tensor(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        shape = self.shapes()[name]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            # Not all ones, so a norm weight that is dropped or misapplied shows in parity.
            values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            values = torch.randn(shape, generator=gen)
        else:
            # 1/sqrt(fan_in) keeps activations O(1) and makes the output distribution peaked, as a
            # trained model's is: near-uniform logits would make top-1 and KL checks meaningless.
            values = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        return values if dtype is None else values.to(dtype)

    def fingerprint(self) -> str:
        return f"preset:{self.name}:seed{self.seed}"

    def write_tokenizer(self, dest: Path) -> dict[str, Any] | None:
        """The preset's real Mistral tokenizer, from the installed mistral-common package."""
        name = PRESET_TOKENIZERS.get(self.name)
        if name is None:
            return None
        info = write_hf_files(packaged(name), dest, version_of(name))
        if info["vocab_size"] != self.config.vocab_size:  # a preset re-dimensioned by a benchmark
            shutil.rmtree(dest)
            return None
        return {**info, "source": f"mistral-common/data/{name}"}


class CheckpointFolder(WeightSource):
    """A local Hugging Face folder: config.json, model.safetensors or a sharded index, tokenizer files."""

    format = "hf-safetensors"
    folder: Path
    # Files beside the weights that are part of the checkpoint's identity (hashed into the manifest).
    described_by: tuple[str, ...] = ("config.json", INDEX)

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        self.name = self.folder.resolve().name
        self.config = self._config()
        self._where = self._index()
        self._check_keys()
        has_tokenizer = any((self.folder / f).is_file() for f in TOKENIZER_FILES[:2])
        self.tokenizer_dir = self.folder if has_tokenizer else None
        self._records: list[FileRecord] | None = None

    def _config(self) -> MistralConfig:
        return load_config(self.folder)

    def _canonical(self, stored: str) -> str:
        """The canonical parameter name of a stored tensor name (HF folders store them as they are)."""
        return stored

    def _stored(self, name: str) -> str:
        return name

    def _convert(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """A stored tensor in the canonical layout (HF folders already are)."""
        return stored

    def _index(self) -> dict[str, Path]:
        """Tensor name -> shard file, from the sharded index or the single file."""
        index = self.folder / INDEX
        single = self.folder / "model.safetensors"
        if index.is_file():
            return self._sharded(index)
        if single.is_file():
            with open_safetensors(single) as fh:
                return {self._canonical(name): single for name in fh.keys()}
        if (self.folder / "consolidated.safetensors").is_file():
            raise CheckpointError(f"{self.folder} holds Mistral's consolidated.safetensors beside a config.json, but no "
                                  f"model.safetensors or {INDEX}: download the HF weights too, or move config.json "
                                  "away to read it as a Mistral folder (params.json)")
        raise CheckpointError(f"no model.safetensors or {INDEX} in {self.folder}; "
                              "only safetensors checkpoints are read (convert .bin files with safetensors first)")

    def _sharded(self, index: Path) -> dict[str, Path]:
        """The index's weight_map, checked: string shard names that are plain files of this folder."""
        try:
            raw = json.loads(index.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index} is not valid JSON ({exc}); re-download the checkpoint's index") from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map object; re-download the checkpoint's index")
        bad = sorted(str(n) for n, s in weight_map.items() if not isinstance(s, str))
        if bad:
            raise CheckpointError(f"{index}: weight_map entries {bad[:3]} are not shard file names")
        outside = sorted({s for s in weight_map.values() if Path(s).name != s or s in ("", ".", "..")})
        if outside:
            raise CheckpointError(f"{index} names shard {outside[0]!r}, which is not a file of {self.folder}; "
                                  "refused (shards must sit beside the index)")
        shards = {s: self.folder / s for s in set(weight_map.values())}
        missing = sorted(s for s, p in shards.items() if not p.is_file())
        if missing:
            raise CheckpointError(f"{index.name} names shards that are missing from {self.folder}: "
                                  f"{missing}. Copy the whole checkpoint folder.")
        where = {name: shards[shard] for name, shard in weight_map.items()}
        held: dict[Path, set[str]] = {}
        for path in sorted(set(where.values())):
            with open_safetensors(path) as fh:
                held[path] = set(fh.keys())
        wrong = sorted(n for n, p in where.items() if n not in held[p])
        unmapped = sorted(set().union(*held.values()) - set(where))
        if wrong:
            raise CheckpointError(f"{index} puts {wrong[0]} in {where[wrong[0]].name}, which does not hold it "
                                  f"({len(wrong)} such); the index does not belong to these shards")
        if unmapped:
            raise CheckpointError(f"{index} does not list {unmapped[0]} ({len(unmapped)} tensor(s) in the shards "
                                  "but not in its weight_map); the index does not belong to these shards")
        return where

    def _check_keys(self) -> None:
        found: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for shard in sorted(set(self._where.values())):
            with open_safetensors(shard) as fh:
                for stored in fh.keys():
                    part, name = fh.get_slice(stored), self._canonical(stored)
                    found[name] = tuple(part.get_shape())
                    dtypes[name] = part.get_dtype()
        if self.config.tie_word_embeddings and "lm_head.weight" in found and not self._tie_holds():
            # transformers does the same: a stored lm_head that differs from the embedding is kept.
            log.warning("config.json ties lm_head to the embedding, but %s stores a different lm_head.weight: "
                        "it is used (as transformers does)", self.folder)
            self.config = dataclasses.replace(self.config, tie_word_embeddings=False)
        expected = self.shapes()
        optional = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        problems = []
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(n for n in set(found) - set(expected) - optional
                            if not n.endswith(_IGNORABLE_SUFFIXES))
        wrong = sorted(f"{n}: file {found[n]}, config expects {expected[n]}"
                       for n in set(found) & set(expected) if found[n] != expected[n])
        not_float = sorted(f"{n}: {dtypes[n]}" for n in expected if n in dtypes
                           and dtypes[n] not in ("F32", "F16", "BF16"))
        for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("wrong-shape tensors", wrong), ("non-float tensors", not_float)):
            if items:
                shown = "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
                problems.append(f"{label} ({len(items)}): {shown}")
        if problems:
            raise CheckpointError(f"checkpoint {self.folder} does not match its config.json: " + "; ".join(problems)
                                  + ". Check that config.json belongs to these weights and that no shard is stale.")
        self._has = found

    def _tie_holds(self) -> bool:
        """Whether a stored lm_head equals the embedding (then tying changes nothing)."""
        try:
            return torch.equal(self.tensor("lm_head.weight", None), self.tensor("model.embed_tokens.weight", None))
        except (KeyError, RuntimeError):
            return False

    def tensor(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        with open_safetensors(self._where[name]) as fh:
            stored = finite(name, fh.get_tensor(self._stored(name)), self._where[name])
        stored = self._convert(name, stored)
        return stored if dtype is None else stored.to(dtype)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        with open_safetensors(self._where[name]) as fh:
            return finite(name, fh.get_slice(self._stored(name))[start:stop], self._where[name])

    def file_records(self) -> list[FileRecord]:
        if self._records is None:
            files = sorted({p for p in self._where.values()}
                           | {p for p in self.folder.iterdir() if p.name in self.described_by
                              or p.name in TOKENIZER_FILES})
            self._records = [FileRecord(p.name, p.stat().st_size, sha256_file(p)) for p in files]
        return self._records
