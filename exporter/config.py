"""Mistral config: read a Hugging Face config.json (transformers 4 or 5 form) or a named preset.

Fields that change the math but are not implemented are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive int or null, got {self.sliding_window}")

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


# Fields read from config.json, by our name; aliases map older spellings.
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings")

def _rope_theta(raw: dict[str, Any]) -> float:
    """rope_theta from the transformers-4 field or the transformers-5 rope_parameters dict."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    for field, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"config field '{field}' has rope_type '{kind}', which is not implemented; only "
                "'default' RoPE is supported. Remove the field only if the checkpoint was trained without it.")
        extra = set(value) - {"rope_type", "type", "rope_theta"}
        if extra:
            raise ConfigError(f"config field '{field}' has unsupported keys {sorted(extra)}")
    if params and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(raw.get("rope_theta", 10000.0))


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        window = None
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        kinds = set(layer_types)
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
    return None if window is None else int(window)


def config_from_dict(raw: dict[str, Any]) -> MistralConfig:
    """Build a MistralConfig from a parsed config.json, rejecting math we do not implement."""
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
    missing = [f for f in _INT_FIELDS + ("num_key_value_heads",) if f not in raw and f != "max_position_embeddings"]
    if missing:
        raise ConfigError(f"config.json lacks required fields {missing}")
    heads = int(raw["num_attention_heads"])
    head_dim = raw.get("head_dim") or int(raw["hidden_size"]) // heads
    return MistralConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(raw),
        sliding_window=_sliding_window(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id") if not isinstance(raw.get("eos_token_id"), list)
        else raw["eos_token_id"][0],
    )


def load_config(folder: Path) -> MistralConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a checkpoint folder needs a Hugging Face config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return config_from_dict(raw)


PRESETS: dict[str, MistralConfig] = {
    # Window 16 is smaller than the sequences tests use, so the rolling buffer wraps.
    "tiny": MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
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
