"""OpenVINO tokenizer/detokenizer IRs beside the model, so OpenVINO GenAI can run the folder.

The conversion (transformers' tokenizer, then openvino-tokenizers) takes about 2 s, a quarter of a
build whose graph is cached, and depends only on the tokenizer files and the versions: its four files
are cached as one entry of the lowered-graph cache's kind (targets/lowered_cache.py, same integrity
rules), keyed by the files' bytes. A hit writes the bytes an earlier conversion wrote (a conversion's
node names carry OpenVINO's per-process counter, so two conversions differ in those names only);
nothing in an entry is run or parsed here, it is copied into the artifact, where the runtime reads it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

from exporter.config import MistralConfig
from targets.lowered_cache import LoweredCache, lowered_spec, pack_files, unpack_files

TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
FILES = (TOKENIZER_XML, "openvino_tokenizer.bin", DETOKENIZER_XML, "openvino_detokenizer.bin")
FORMAT = "mistral-export/openvino-tokenizer-cache"
MAX_BYTES = 256 << 20  # a 130k-vocabulary (tekken) tokenizer's IRs are a few megabytes


def write_tokenizer(tokenizer_dir: Path | None, out_dir: Path) -> dict[str, Any]:
    """Convert the checkpoint's tokenizer with openvino-tokenizers (or copy the cached conversion);
    a reason when it cannot be done."""
    if tokenizer_dir is None:
        return {"status": "none", "reason": "the checkpoint has no tokenizer"}
    try:
        import openvino_tokenizers  # noqa: F401 - the conversion's package, and part of the cache key
        import transformers  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped", "reason": f"openvino-tokenizers or transformers not installed ({exc.name})"}
    cache = LoweredCache.open("openvino-tokenizers", FORMAT, "irs", MAX_BYTES)
    spec = _spec(tokenizer_dir) if cache is not None else None
    files = cache.load(spec, lambda meta, data: _unpack(data)) if cache is not None else None
    if files is None:
        with tempfile.TemporaryDirectory(prefix="mistral-export-tok-") as tmp:
            _convert(tokenizer_dir, Path(tmp))
            files = [(Path(tmp) / name).read_bytes() for name in FILES]
        if cache is not None:
            cache.write(spec, pack_files(files), {})
    for name, data in zip(FILES, files):
        (out_dir / name).write_bytes(data)
    return {"status": "converted", "files": [TOKENIZER_XML, DETOKENIZER_XML]}


def _convert(tokenizer_dir: Path, out_dir: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer, detokenizer = convert_tokenizer(hf, with_detokenizer=True)
    ov.save_model(tokenizer, out_dir / TOKENIZER_XML)
    ov.save_model(detokenizer, out_dir / DETOKENIZER_XML)


def _spec(tokenizer_dir: Path) -> dict[str, Any]:
    """The conversion's inputs: every file of the tokenizer folder, and the converting packages."""
    digest = hashlib.sha256()
    for path in sorted(p for p in tokenizer_dir.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    versions = {name: importlib.metadata.version(name)
                for name in ("openvino", "openvino-tokenizers", "transformers", "tokenizers")}
    return lowered_spec(digest.hexdigest(), {}, Path(__file__).parent, versions)


def _unpack(data: bytes) -> list[bytes]:
    return unpack_files(data, len(FILES))


def write_genai_config(cfg: MistralConfig, out_dir: Path) -> None:
    """config.json and generation_config.json as an OpenVINO GenAI model folder carries them."""
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
