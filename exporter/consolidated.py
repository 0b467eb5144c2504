"""Mistral's own download format: params.json + consolidated.safetensors in mistral-inference naming.

Names map onto the canonical (Hugging Face) ones as transformers' convert_mistral_weights_to_hf.py
maps them. The layout differs in one place: Mistral rotates interleaved pairs (x0, x1), (x2, x3)...
of each head, where the canonical model rotates halves, so the rows of wq and wk are reordered per
head (even rows first, then odd) as they are read. wv, wo and the MLP are stored as they are used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointFolder, open_safetensors
from exporter.config import MistralConfig, config_from_dict
from exporter.tokenizer import version_of, write_hf_files
from exporter.errors import CheckpointError, ConfigError

PARAMS = "params.json"
WEIGHTS = "consolidated.safetensors"
TOKENIZERS = ("tokenizer.model.v3", "tokenizer.model.v2", "tokenizer.model.v1", "tokenizer.model", "tekken.json")
# params.json fields of architectures the canonical model does not implement.
_UNSUPPORTED = ("moe", "lora", "vision_encoder", "quantization", "mamba")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_STORED_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_STORED_TOP = {v: k for k, v in _TOP_NAMES.items()}


def is_consolidated(folder: Path) -> bool:
    """A Mistral download folder: params.json beside the weights, and no HF config.json."""
    return (folder / PARAMS).is_file() and not (folder / "config.json").is_file()


def config_from_params(raw: Any, where: Path) -> MistralConfig:
    """The canonical config of a params.json, strictly typed, with nothing guessed that changes the math."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "transformer") != "transformer":
        raise ConfigError(f"{where}: model_type '{raw['model_type']}' is not a dense Mistral transformer")
    present = [k for k in _UNSUPPORTED if raw.get(k)]
    if present:
        raise ConfigError(f"{where} sets {present}: only dense Mistral models without adapters are supported")
    if "rope_theta" not in raw:
        # mistral-inference assumes 1e6 when it is absent; transformers' converter and Mistral 7B v0.1's
        # original code use 1e4. Either guess would silently change every logit for some checkpoint.
        raise ConfigError(f"{where} lacks rope_theta; add it: 10000.0 for Mistral 7B v0.1, 1000000.0 for v0.2/v0.3")
    window = raw.get("sliding_window")
    if isinstance(window, str) and window.isdigit():
        window = int(window)  # some releases write it as a string (transformers' converter accepts that too)
    if isinstance(window, list):
        raise ConfigError(f"{where}: per-layer sliding windows {window} are not implemented")
    renamed = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
               "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
               "head_dim": "head_dim", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
               "max_seq_len": "max_position_embeddings"}
    missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size") if k not in raw]
    if missing:
        raise ConfigError(f"{where} lacks the required field(s) {missing}")
    hf = {hf_name: raw[name] for name, hf_name in renamed.items() if name in raw}
    try:
        return config_from_dict({**hf, "sliding_window": window, "tie_word_embeddings": False})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def interleaved_to_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered per head from Mistral's interleaved rotary pairs to the
    canonical rotate-half layout: within each head, rows 0, 2, 4, ... then 1, 3, 5, ..."""
    head_dim = weight.shape[0] // heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rows = (torch.arange(heads)[:, None] * head_dim + order[None, :]).reshape(-1)
    return weight.index_select(0, rows)


class ConsolidatedFolder(CheckpointFolder):
    """A Mistral download folder (params.json, consolidated.safetensors, tokenizer.model.vN or tekken.json)."""

    format = "mistral-consolidated"
    described_by = (PARAMS,) + TOKENIZERS

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.tokenizer_dir = None  # Mistral's own files are converted, not copied (write_tokenizer)

    def write_tokenizer(self, dest: Path) -> dict[str, Any] | None:
        """The folder's SentencePiece file converted to HF files; a tekken file is hashed into the
        manifest but not carried (no converter here yet), which the manifest says."""
        spm = next((self.folder / n for n in TOKENIZERS if n.startswith("tokenizer.model")
                    and (self.folder / n).is_file()), None)
        if spm is None:
            return None
        return {**write_hf_files(self.inside(spm), dest, version_of(spm.name)), "source": spm.name}

    def _config(self) -> MistralConfig:
        path = self.folder / PARAMS
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON (or not UTF-8): {exc}") from None
        return config_from_params(raw, path)

    def _index(self) -> dict[str, Path]:
        weights = self.folder / WEIGHTS
        if not weights.is_file():
            pickled = sorted(p.name for p in self.folder.glob("consolidated*.pth"))
            hint = (f"{pickled[0]} is a pickle, which is never loaded; convert it to {WEIGHTS} with safetensors"
                    if pickled else f"download {WEIGHTS} with the folder")
            raise CheckpointError(f"no {WEIGHTS} in {self.folder}; {hint}")
        with open_safetensors(weights) as fh:
            return {self._canonical(name): weights for name in fh.keys()}

    def _canonical(self, stored: str) -> str:
        if stored in _TOP_NAMES:
            return _TOP_NAMES[stored]
        match = _LAYER.match(stored)
        if match and match.group(2) in _LAYER_NAMES:
            return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
        # Marked, so the key check reports it as unexpected and it cannot pass for the canonical tensor
        # of the same name (a file holding `norm.weight` and `model.norm.weight` would otherwise merge).
        return f"{stored} (not a mistral-inference name)"

    def _stored(self, name: str) -> str:
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            return f"layers.{layer}." + _STORED_LAYER[rest]
        return _STORED_TOP[name]

    def _convert(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        if name.endswith("self_attn.q_proj.weight"):
            return interleaved_to_halves(stored, self.config.num_attention_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return interleaved_to_halves(stored, self.config.num_key_value_heads)
        return stored

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return self.tensor(name, None)[start:stop]  # reordered rows: convert the tensor, then slice
        return super().row_block(name, start, stop)
