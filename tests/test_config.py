"""config.json reading: both transformers forms, variants, and refusals of unimplemented math."""

from __future__ import annotations

import pytest

from exporter.config import PRESETS, config_from_dict, load_config, preset
from exporter.errors import ConfigError
from tests.conftest import TINY_HF, write_config

BASE = {**TINY_HF, "model_type": "mistral"}


def test_transformers4_and_5_forms_agree() -> None:
    v4 = config_from_dict({**BASE, "rope_theta": 1e6})
    v5 = config_from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert v4 == v5 and v4.rope_theta == 1e6


def test_variants() -> None:
    cfg = config_from_dict({**BASE, "sliding_window": None, "head_dim": 16, "num_key_value_heads": 1,
                            "tie_word_embeddings": True})
    assert cfg.sliding_window is None and cfg.head_dim == 16 and cfg.n_rep == 4 and cfg.tie_word_embeddings
    assert config_from_dict(BASE).head_dim == 8
    full = config_from_dict({**BASE, "layer_types": ["full_attention"] * 2})
    assert full.sliding_window is None
    assert config_from_dict({**BASE, "layer_types": ["sliding_attention"] * 2}).sliding_window == 4


@pytest.mark.parametrize("patch,needle", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_parameters"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"sliding_window": 0}, "sliding_window"),
])
def test_unimplemented_math_is_an_error_naming_the_field(patch: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({**BASE, **patch})


def test_missing_and_broken_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    raw = dict(BASE)
    raw.pop("hidden_size")
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(write_config(tmp_path / "x", raw))


def test_presets() -> None:
    assert set(PRESETS) == {"tiny", "mistral-7b-v0.1", "mistral-7b-v0.3"}
    assert preset("tiny").sliding_window < 30  # smaller than test sequences, so the ring wraps
    assert preset("mistral-7b-v0.1").sliding_window == 4096
    assert preset("mistral-7b-v0.3").sliding_window is None and preset("mistral-7b-v0.3").vocab_size == 32768
    with pytest.raises(ConfigError, match="valid presets: tiny"):
        preset("mistral-70b")
