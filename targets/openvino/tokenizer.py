"""OpenVINO tokenizer/detokenizer IRs beside the model, so OpenVINO GenAI can run the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.config import MistralConfig

TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"


def write_tokenizer(tokenizer_dir: Path | None, out_dir: Path) -> dict[str, Any]:
    """Convert the checkpoint's tokenizer with openvino-tokenizers; a reason when it cannot be done."""
    if tokenizer_dir is None:
        return {"status": "none", "reason": "the checkpoint has no tokenizer"}
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer
    except ImportError as exc:
        return {"status": "skipped", "reason": f"openvino-tokenizers or transformers not installed ({exc.name})"}
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer, detokenizer = convert_tokenizer(hf, with_detokenizer=True)
    ov.save_model(tokenizer, out_dir / TOKENIZER_XML)
    ov.save_model(detokenizer, out_dir / DETOKENIZER_XML)
    return {"status": "converted", "files": [TOKENIZER_XML, DETOKENIZER_XML]}


def write_genai_config(cfg: MistralConfig, out_dir: Path) -> None:
    """config.json and generation_config.json as an OpenVINO GenAI model folder carries them."""
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
