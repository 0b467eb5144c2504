"""Mistral config: read a Hugging Face config.json (transformers 4 or 5 form) or a named preset.

Fields that change the math but are not implemented are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import ConfigError


@dataclass(frozen=True)
class MistralConfig:
    """The dimensions and constants the canonical model needs, nothing more."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        # Also built from manifests, which anyone may have written: every field is checked by type.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            _number(getattr(self, name), name)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ConfigError(f"config field '{name}' must be a token id in [0, {self.vocab_size}), got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config field 'tie_word_embeddings' must be true or false, got {self.tie_word_embeddings!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
            raise ConfigError(f"config field 'sliding_window' must be an integer of at least 2, or null; got {window!r}")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style config.json for this model."""
        d = self.to_dict()
        theta = d.pop("rope_theta")
        d.update(model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": theta})
        return d


def _int(raw: dict[str, Any], name: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field (JSON integers only: not a bool, a fraction or a string), at least minimum."""
    if name not in raw and default is None:
        raise ConfigError(f"config.json lacks the required field '{name}'")
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"config field '{name}' must be at least {minimum}, got {value}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config field '{name}' must be a positive number, got {value!r}")
    return float(value)


def _rope_theta(raw: dict[str, Any]) -> float:
    """rope_theta from the transformers-4 field or the transformers-5 rope_parameters dict."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    for field, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{field}' must be an object, got {value!r}")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"config field '{field}' has rope_type '{kind}', which is not implemented; only "
                "'default' RoPE is supported. Remove the field only if the checkpoint was trained without it.")
        extra = set(value) - {"rope_type", "type", "rope_theta"}
        if extra:
            raise ConfigError(f"config field '{field}' has unsupported keys {sorted(extra)}")
    if params and "rope_theta" in params:
        return _number(params["rope_theta"], "rope_parameters.rope_theta")
    return _number(raw.get("rope_theta", 10000.0), "rope_theta")


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        window = None
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ConfigError(f"config field 'layer_types' must be a list, got {layer_types!r}")
        kinds = set(map(str, layer_types))
        if len(layer_types) != raw.get("num_hidden_layers"):
            raise ConfigError("config field 'layer_types' must have one entry per layer "
                              f"({raw.get('num_hidden_layers')}), got {len(layer_types)}")
        if kinds == {"full_attention"}:
            window = None
        elif kinds == {"sliding_attention"}:
            if window is None:
                raise ConfigError("config field 'layer_types' says sliding_attention but sliding_window is null")
        else:
            raise ConfigError(f"config field 'layer_types' mixes {sorted(kinds)}: per-layer attention kinds "
                              "are not implemented; all layers must be sliding_attention or full_attention")
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"config field 'sliding_window' must be an integer of at least 2, or null; got {window!r}")
    return window


def _token_id(raw: dict[str, Any], name: str, vocab: int) -> int | None:
    """bos/eos id (an eos list keeps its first id, as generation does), inside the vocabulary."""
    value = raw.get(name)
    ids = value if isinstance(value, list) else [value]
    for token in ids:
        if token is None and value is None:
            return None
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ConfigError(f"config field '{name}' must be a token id in [0, {vocab}), got {value!r}")
    if not ids:
        raise ConfigError(f"config field '{name}' is an empty list")
    return ids[0]


def config_from_dict(raw: Any) -> MistralConfig:
    """Build a MistralConfig from a parsed config.json, rejecting math we do not implement and any
    field of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "mistral") != "mistral":
        raise ConfigError(f"config field 'model_type' is '{raw['model_type']}'; only 'mistral' is supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config field 'hidden_act' is '{raw['hidden_act']}'; only 'silu' is implemented")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field):
            raise ConfigError(f"config field '{field}' is true; biases are not implemented for Mistral")
    if raw.get("quantization_config") is not None:
        raise ConfigError("config field 'quantization_config' is set: pre-quantized checkpoints are not "
                          "supported; export from the full-precision checkpoint and pick --precision")
    hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        head_dim = hidden // heads  # as transformers derives it
    vocab = _int(raw, "vocab_size")
    tied = raw.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConfigError(f"config field 'tie_word_embeddings' must be true or false, got {tied!r}")
    return MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=_int(raw, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=_int(raw, "num_key_value_heads", heads) if raw.get("num_key_value_heads") is not None
        else heads,
        head_dim=_int({"head_dim": head_dim}, "head_dim"),
        rms_norm_eps=_number(raw.get("rms_norm_eps", 1e-5), "rms_norm_eps"),
        rope_theta=_rope_theta(raw),
        sliding_window=_sliding_window(raw),
        max_position_embeddings=_int(raw, "max_position_embeddings", 32768),
        tie_word_embeddings=tied,
        bos_token_id=_token_id(raw, "bos_token_id", vocab),
        eos_token_id=_token_id(raw, "eos_token_id", vocab),
    )


def load_config(folder: Path) -> MistralConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a checkpoint folder needs a Hugging Face config.json")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON (or not UTF-8): {exc}") from None
    return config_from_dict(raw)


PRESETS: dict[str, MistralConfig] = {
    # Window 16 is smaller than the sequences tests use, so the rolling buffer wraps.
    "tiny": MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=16,
                          max_position_embeddings=4096),
    "mistral-7b-v0.1": MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                                     sliding_window=4096, max_position_embeddings=32768),
    "mistral-7b-v0.3": MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
                                     sliding_window=None, max_position_embeddings=32768),
}


def preset(name: str) -> MistralConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
