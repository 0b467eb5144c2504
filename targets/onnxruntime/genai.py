"""genai_config.json: what onnxruntime-genai's og.Model needs to run the GQA form unchanged.

The names are the graph's own (passes/io.py). The sliding_window section tells genai to allocate a
window-sized past/present buffer (GQA sliding_window_cache) instead of one of max_length rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from exporter.config import MistralConfig

FILENAME = "genai_config.json"


def genai_config(cfg: MistralConfig, model_file: str, context: int, window: int | None, provider: str) -> dict[str, Any]:
    decoder: dict[str, Any] = {
        "session_options": {"log_id": "onnxruntime-genai",
                            "provider_options": [] if provider == "cpu" else [{provider: {}}]},
        "filename": model_file,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    if window:
        decoder["sliding_window"] = {"window_size": window, "slide_key_value_cache": False, "slide_inputs": False,
                                     "layers": list(range(cfg.num_hidden_layers)), "cache_slack": 0}
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else -1
    return {
        "model": {"bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else -1,
                  "context_length": context, "decoder": decoder, "eos_token_id": eos, "pad_token_id": eos,
                  "type": "mistral", "vocab_size": cfg.vocab_size},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "early_stopping": True,
                   "length_penalty": 1.0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def write_genai_config(out_dir: Path, config: dict[str, Any]) -> None:
    (out_dir / FILENAME).write_text(json.dumps(config, indent=2) + "\n")


# og.Tokenizer reads these beside genai_config.json, not from a subfolder.
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def place_tokenizer(tokenizer_dir: Path | None, out_dir: Path) -> list[str]:
    """Copies of the artifact's tokenizer files where onnxruntime-genai looks for them."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        return []
    placed = [n for n in GENAI_TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    for name in placed:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return placed
