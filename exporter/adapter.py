"""PEFT LoRA adapters, merged into the weights as they stream: W + scale * B @ A per targeted weight.

Only what a merge reproduces exactly is accepted: plain LoRA on linear layers and embeddings (rank,
alpha, rsLoRA, per-module rank and alpha patterns) and modules_to_save replacements. Anything a merge
would silently get wrong (DoRA, trained biases, activated LoRA, other PEFT types) is refused. Only
adapter_config.json and adapter_model.safetensors are read: a pickled adapter_model.bin never is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import FileRecord, WeightSource, expected_shapes, finite, open_safetensors, sha256_file
from exporter.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix in front of the base model's own names
# Config fields whose non-default value means a model the merge cannot reproduce.
_REFUSED_FLAGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "lora_bias": "LoRA bias terms (Mistral's layers have no bias)",
    "fan_in_fan_out": "fan_in_fan_out weights (a Conv1D layout Mistral does not use)",
    "layer_replication": "layer replication (it changes the number of layers)",
    "alora_invocation_tokens": "activated LoRA (it applies only after its invocation tokens, so no merge reproduces it)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on bare parameters",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUNTIME_DIR = "adapters"  # where an artifact keeps its switchable adapter files


@dataclass(frozen=True)
class Delta:
    """What the adapter does to one canonical weight: a low-rank update, or a whole replacement."""

    a: str | None = None  # key of A [r, in] (embeddings: [r, num_embeddings])
    b: str | None = None  # key of B [out, r] (embeddings: [dim, r])
    scale: float = 1.0
    embedding: bool = False  # PEFT's embedding LoRA stores the product transposed
    replace: str | None = None  # key of a whole replacement weight (modules_to_save, a saved base layer)


class LoraAdapter:
    """A PEFT LoRA folder, checked against the base model's parameter shapes."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"adapter folder {self.folder} does not exist")
        self.weights = self.folder / ADAPTER_WEIGHTS
        if not self.weights.is_file():
            pickled = " (adapter_model.bin is a pickle and is never read: save it with safe_serialization=True)" \
                if (self.folder / "adapter_model.bin").exists() else ""
            raise CheckpointError(f"{self.folder} has no {ADAPTER_WEIGHTS}{pickled}; give a PEFT adapter folder")
        self.config = self._read_config()
        self._check_targets(shapes)
        self.deltas = self._plan(shapes)
        self._records: list[FileRecord] | None = None

    def _read_config(self) -> dict[str, Any]:
        path = self.folder / ADAPTER_CONFIG
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise CheckpointError(f"{self.folder} has no {ADAPTER_CONFIG}; give a PEFT adapter folder") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save the adapter with PEFT") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a JSON object; re-save the adapter with PEFT")
        kind = raw.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(f"{path}: peft_type {kind!r} is not supported; only LoRA adapters (peft_type "
                                  "LORA) can be merged")
        for field, what in _REFUSED_FLAGS.items():
            if raw.get(field) not in (None, False, [], {}, 0):
                raise CheckpointError(f"{path}: {what} is not supported ({field}={raw[field]!r}); export a plain "
                                      "LoRA adapter, or merge it with PEFT and build the merged checkpoint")
        if raw.get("bias", "none") != "none":
            raise CheckpointError(f"{path}: bias={raw['bias']!r} trains biases Mistral's layers do not have; only "
                                  "bias='none' adapters can be merged")
        for field in ("r", "lora_alpha"):
            if not isinstance(raw.get(field), (int, float)) or isinstance(raw.get(field), bool) or raw[field] <= 0:
                raise CheckpointError(f"{path}: {field} must be a positive number, got {raw.get(field)!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(raw.get(field) or {}, dict):
                raise CheckpointError(f"{path}: {field} must be an object, got {raw[field]!r}")
        return raw

    def _check_targets(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every module the config targets must be one of ours, as PEFT would have matched it."""
        targets = self.config.get("target_modules")
        modules = [name.removesuffix(".weight") for name in shapes]
        if isinstance(targets, str):
            if targets != "all-linear" and not any(re.fullmatch(targets, m) for m in modules):
                raise CheckpointError(f"{self.folder / ADAPTER_CONFIG}: target_modules {targets!r} matches no "
                                      "module of this model; the adapter was made for another architecture")
            return
        missing = [t for t in targets or [] if not any(m == t or m.endswith(f".{t}") for m in modules)]
        if missing:
            raise CheckpointError(f"{self.folder / ADAPTER_CONFIG}: target_modules {missing} are modules this model "
                                  "does not have (it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                  "down_proj, embed_tokens, lm_head); the adapter was made for another architecture")

    def _alpha(self, module: str) -> float:
        """lora_alpha, or the alpha_pattern entry that matches the module, matched as PEFT matches it."""
        for pattern, alpha in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(alpha)
        return float(self.config["lora_alpha"])

    def _plan(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Delta]:
        """Canonical weight name -> its delta, every tensor of the file accounted for and shape-checked."""
        with open_safetensors(self.weights) as fh:
            stored = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
        if not stored:
            raise CheckpointError(f"{self.weights} holds no tensors; the adapter is empty")
        pairs: dict[str, dict[str, str]] = {}
        deltas: dict[str, Delta] = {}
        for key in sorted(stored):
            name = key.removeprefix(PREFIX)
            for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "eA"),
                                 (".lora_embedding_B", "eB")):
                if name.endswith(suffix):
                    pairs.setdefault(name.removesuffix(suffix), {})[role] = key
                    break
            else:
                self._other(key, name, stored, shapes, deltas)
        for module, roles in pairs.items():
            target = self._target(module, shapes)
            # A targeted embedding layer's saved base weight replaces the base's, then the update applies.
            replaced = deltas[target].replace if target in deltas else None
            deltas[target] = self._pair(module, roles, stored, shapes, replaced)
        return deltas

    def _other(self, key: str, name: str, stored: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]],
               deltas: dict[str, Delta]) -> None:
        """A tensor that is not a LoRA factor: a replacement of a whole weight, or refused."""
        if name.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in name:
            raise CheckpointError(f"{self.weights} holds DoRA magnitudes ({key}); DoRA is not supported")
        if name.endswith(".bias"):
            raise CheckpointError(f"{self.weights} holds a bias ({key}); Mistral's layers have no bias, so it "
                                  "cannot be merged")
        target = name.replace(".base_layer.weight", ".weight").replace(".modules_to_save.default.weight", ".weight")
        if target not in shapes:
            raise CheckpointError(f"{self.weights} holds {key}, which is not a weight this model has (its weights "
                                  "are named like model.layers.0.self_attn.q_proj.weight): the adapter was made "
                                  "for another architecture")
        if stored[key] != shapes[target]:
            raise CheckpointError(f"{self.weights}: {key} is {list(stored[key])} but the base model's {target} is "
                                  f"{list(shapes[target])}; the adapter was trained on another base model")
        deltas[target] = Delta(replace=key)

    def _target(self, module: str, shapes: dict[str, tuple[int, ...]]) -> str:
        target = f"{module}.weight"
        if target not in shapes:
            raise CheckpointError(f"the adapter targets {module}, a module this model does not have (its "
                                  "targetable modules are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                  "down_proj, embed_tokens, lm_head); the adapter was made for another architecture")
        return target

    def _pair(self, module: str, roles: dict[str, str], stored: dict[str, tuple[int, ...]],
              shapes: dict[str, tuple[int, ...]], replaced: str | None) -> Delta:
        embedding = "eA" in roles or "eB" in roles
        a, b = (roles.get("eA"), roles.get("eB")) if embedding else (roles.get("A"), roles.get("B"))
        if a is None or b is None:
            raise CheckpointError(f"{self.weights} holds only one of the two LoRA factors of {module}; re-save the "
                                  "adapter with PEFT")
        out, inp = shapes[f"{module}.weight"]
        rank = stored[a][0]
        # Linear: A [r, in], B [out, r]. Embedding [vocab, dim]: A [r, vocab], B [dim, r].
        want = ((rank, out), (inp, rank)) if embedding else ((rank, inp), (out, rank))
        if (stored[a], stored[b]) != want:
            raise CheckpointError(f"{self.weights}: the LoRA factors of {module} are A {list(stored[a])} and B "
                                  f"{list(stored[b])}, which do not fit its base weight {[out, inp]}; the adapter "
                                  "was trained on another base model")
        root = math.sqrt(rank) if self.config.get("use_rslora") else rank
        return Delta(a=a, b=b, scale=self._alpha(module) / root, embedding=embedding, replace=replaced)

    # -- applying it ------------------------------------------------------------------------------

    def _factor(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """A stored tensor in fp32, or only its rows (a replacement read block by block stays a block)."""
        with open_safetensors(self.weights) as fh:
            stored = fh.get_tensor(key) if rows is None else fh.get_slice(key)[rows]
            return finite(key, stored, self.weights).to(torch.float32)

    def update(self, name: str, base: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Rows `rows` (all when None) of the named weight with the adapter applied, in base's dtype."""
        delta = self.deltas.get(name)
        if delta is None:
            return base
        if delta.replace is not None:
            base = self._factor(delta.replace, rows).to(base.dtype)
        rows = rows or slice(0, None)
        if delta.a is None or delta.b is None:
            return base
        a, b = self._factor(delta.a), self._factor(delta.b)  # type: ignore[arg-type]
        # Linear: W[out, in] += B[out, r] @ A[r, in]. Embedding: W[vocab, dim] += (B[dim, r] @ A[r, vocab]).T
        product = a[:, rows].T @ b.T if delta.embedding else b[rows] @ a
        return (base.to(torch.float32) + delta.scale * product).to(base.dtype)

    def check_runtime(self, base: WeightSource) -> None:
        """A runtime adapter is a low-rank update of linear layers only: what a graph's LoRA inputs carry.
        PEFT saves a targeted lm_head's base weight too; a copy equal to the base's is no replacement."""
        for name, delta in list(self.deltas.items()):
            if delta.replace and delta.a and torch.equal(self._factor(delta.replace),
                                                         base.parameter(name, torch.float32)):
                self.deltas[name] = dataclasses.replace(delta, replace=None)
        whole = sorted(n for n, d in self.deltas.items() if d.replace is not None or d.embedding)
        if whole:
            raise CheckpointError(f"adapter {self.folder} replaces or adapts {whole[0]} (modules_to_save or an "
                                  "embedding LoRA), which a runtime adapter cannot switch; merge it with --adapter")

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear weight's update as the graph applies it, x @ A.T @ (scale * B).T: A [r, in], scale * B [out, r]."""
        delta = self.deltas[name]
        return self._factor(delta.a), delta.scale * self._factor(delta.b)  # type: ignore[arg-type]

    def file_records(self) -> list[FileRecord]:
        if self._records is None:
            self._records = [FileRecord(p.name, p.stat().st_size, sha256_file(p))
                             for p in (self.folder / ADAPTER_CONFIG, self.weights)]
        return self._records

    def describe(self) -> dict[str, Any]:
        """What the manifest records: where it was, its files and hashes, and the config that was merged."""
        keep = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save", "rank_pattern",
                "alpha_pattern", "base_model_name_or_path", "peft_version")
        return {"path": str(self.folder.resolve()), "name": self.folder.resolve().name, "merge": "merged",
                "files": [r.to_dict() for r in self.file_records()],
                "config": {k: self.config.get(k) for k in keep if k in self.config},
                "weights": {name: " + ".join(["replaced"] * bool(d.replace) + [f"lora scale {d.scale:g}"] * bool(d.a))
                            for name, d in sorted(self.deltas.items())}}


class AdaptedWeights(WeightSource):
    """A base source with a LoRA adapter merged into each weight it hands out, one tensor at a time."""

    def __init__(self, base: WeightSource, adapter_dir: Path) -> None:
        self.base = base
        tied = base.config.tie_word_embeddings
        untied = dataclasses.replace(base.config, tie_word_embeddings=False)
        self.adapter = LoraAdapter(adapter_dir, expected_shapes(untied))
        # An adapter that changes either side of tied embeddings unties them (PEFT adapts one module).
        touches = {"lm_head.weight", "model.embed_tokens.weight"} & set(self.adapter.deltas)
        self.config = untied if tied and touches else base.config
        self.name = f"{base.name}-{self.adapter.folder.resolve().name}"
        self.format, self.folder, self.hub_id = base.format, base.folder, base.hub_id
        self.tokenizer_dir = base.tokenizer_dir

    def origin(self) -> WeightSource:
        return self.base

    def tensor(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        base = self.base.parameter(name, None)
        merged = self.adapter.update(name, base)
        return merged if dtype is None else merged.to(dtype)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        base = self.base.rows(name)[start:stop]
        return self.adapter.update(name, base, slice(start, stop))

    def file_records(self) -> list[FileRecord]:
        return self.base.file_records()

    def write_tokenizer(self, dest: Path) -> dict[str, Any] | None:
        return self.base.write_tokenizer(dest)

    def fingerprint(self) -> str:
        """The base's identity and the adapter's file hashes together."""
        parts = [self.base.fingerprint(), [r.to_dict() for r in self.adapter.file_records()]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def open_runtime_adapters(folders: dict[str, Path], base: WeightSource) -> dict[str, LoraAdapter]:
    """Adapters to switch at run time, by name: linear low-rank updates only, each checked against the model."""
    config = base.config
    shapes = expected_shapes(dataclasses.replace(config, tie_word_embeddings=False))
    adapters = {}
    for name, folder in folders.items():
        if not _NAME.match(name) or name == "none":  # it names the adapter's file; `none` means the base
            raise CheckpointError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting "
                                  "with a letter or digit, and not 'none'")
        adapter = LoraAdapter(folder, shapes)
        adapter.check_runtime(base)
        if config.tie_word_embeddings and "lm_head.weight" in adapter.deltas:
            raise CheckpointError(f"adapter {name} adapts lm_head, which this model ties to its embedding; merge "
                                  "it with --adapter")
        adapters[name] = adapter
    return adapters


def runtime_record(adapter: LoraAdapter, file: str, parameters: int, **extra: Any) -> dict[str, Any]:
    """What the manifest records about one switchable adapter file of an artifact."""
    return {"file": file, "parameters": parameters, **extra, "source": adapter.describe() | {"merge": "runtime"}}


def check_recorded(adapter: LoraAdapter, recorded: dict[str, Any]) -> None:
    """The adapter must be the one an artifact records, file for file."""
    if [r.to_dict() for r in adapter.file_records()] != recorded.get("files"):
        raise CheckpointError(f"adapter {adapter.folder} differs from the one this artifact was built with (file "
                              "hashes differ); pass the original with --reference-adapter")
