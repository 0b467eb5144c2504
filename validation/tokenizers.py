"""Tokenizer parity: every tokenizer the artifact carries encodes and decodes a fixed multilingual text set
exactly as the reference tokenizer does.

The reference is mistral-common's own tokenizer when the artifact's tokenizer.model is byte-identical to
one that mistral-common ships (Mistral's reference implementation), else the artifact's HF tokenizer.
Checked: the HF tokenizer (transformers), onnxruntime-genai's og.Tokenizer for ORT artifacts that carry a
genai_config.json, and the openvino-tokenizers IRs of OpenVINO artifacts. A client that is not installed
is reported as skipped, never as passed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from exporter.manifest import listed_dir
from validation.text import mistral_tokenizer

TEXTS_FILE = "data/tokenizer_texts.json"
Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]
Skipped = tuple[str, str]  # (tokenizer, why it could not be checked here)


@dataclass(frozen=True)
class Codec:
    """One tokenizer as the check drives it: text -> content ids (no BOS), and a whole sequence (BOS
    first, as a client decodes what it generated) -> text."""

    name: str
    encode: Encode
    decode: Decode
    note: str = ""


def texts(key: str = "texts") -> list[dict[str, str]]:
    """The packaged text set (`texts`: gated) or its `known_differences` (reported, not gated, each with its
    reason): [{"label", "text", ...}]."""
    raw = json.loads(resources.files("validation").joinpath(TEXTS_FILE).read_text(encoding="utf-8"))
    return [dict(t) for t in raw[key]]


def reference_codec(folder: Path, hf: Any) -> tuple[Codec, str]:
    found = mistral_tokenizer(folder)
    if found is not None:
        raw = found[0].instruct_tokenizer.tokenizer
        return Codec("mistral-common", lambda t: raw.encode(t, bos=False, eos=False), raw.decode), \
            f"mistral-common {found[1]} (byte-identical to the artifact's tokenizer.model)"
    return hf_codec(hf), "the artifact's own HF tokenizer (its tokenizer.model is not one mistral-common ships)"


def hf_codec(hf: Any) -> Codec:
    return Codec("hf", lambda t: list(hf.encode(t, add_special_tokens=False)),
                 lambda ids: hf.decode(ids, skip_special_tokens=True))


def genai_codec(artifact: Path) -> Codec | Skipped:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime-genai", "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    tok = og.Tokenizer(str(artifact))
    bos = tok.bos_token_id

    def encode(text: str) -> list[int]:
        ids = [int(i) for i in tok.encode(text)]
        return ids[1:] if ids[:1] == [bos] else ids

    return Codec("onnxruntime-genai", encode, lambda ids: tok.decode(ids),
                 "og.Tokenizer.encode adds no BOS; the client prepends it")


def openvino_codec(artifact: Path, files: tuple[str, str]) -> Codec | Skipped:
    try:
        import numpy as np
        import openvino as ov
        import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops)
    except ImportError as exc:
        return "openvino-tokenizers", f"{exc.name} is not installed (pip install openvino-tokenizers)"
    core = ov.Core()
    enc = core.compile_model(str(artifact / files[0]), "CPU")
    dec = core.compile_model(str(artifact / files[1]), "CPU")
    bos = None

    def encode(text: str) -> list[int]:
        ids = [int(i) for i in enc([text])["input_ids"][0]]
        return ids[1:] if bos is not None and ids[:1] == [bos] else ids

    def decode(ids: list[int]) -> str:
        return str(dec(np.array([ids], dtype=np.int64))["string_output"][0])

    probe = enc([""])["input_ids"][0]
    bos = int(probe[0]) if len(probe) else None
    return Codec("openvino-tokenizers", encode, decode)


def _clients(artifact: Path, manifest: dict[str, Any]) -> list[Codec | Skipped]:
    target = manifest["target"]
    out: list[Codec | Skipped] = []
    if target.get("genai_tokenizer"):
        out.append(genai_codec(artifact))
    ir = target.get("tokenizer_ir") or {}
    if ir.get("status") == "converted":
        out.append(openvino_codec(artifact, tuple(ir["files"])))
    return out


def mismatch(codec: Codec, reference: Codec, text: str, bos: list[int]) -> dict[str, Any] | None:
    """How codec differs from the reference on one text (`check` encode or decode, and where), or None."""
    want, got = reference.encode(text), codec.encode(text)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return {"check": "encode", "at": at, "ids": got[max(0, at - 3):at + 5],
                "reference_ids": want[max(0, at - 3):at + 5]}
    back, ref_back = codec.decode(bos + want), reference.decode(bos + want)
    if back != ref_back:
        return {"check": "decode", "decoded": back, "reference_decoded": ref_back}
    return None


def _compare(codec: Codec, reference: Codec, items: list[dict[str, str]], bos: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"tokenizer": codec.name, "status": "passed", "texts": len(items),
                           **({"note": codec.note} if codec.note else {})}
    for item in items:
        found = mismatch(codec, reference, item["text"], bos)
        if found is not None:
            check = found.pop("check")
            return {**row, "status": "failed", "check": check,
                    "first_mismatch": {"label": item["label"], "text": item["text"], **found}}
    return row


def check_tokenizers(artifact: Path, manifest: dict[str, Any], hf: Any) -> dict[str, Any]:
    """The report's tokenizer section; status failed when any carried tokenizer differs from the reference."""
    if not manifest["model"].get("tokenizer"):
        return {"status": "not-run", "reason": "the artifact carries no tokenizer"}
    folder = listed_dir(artifact, manifest, manifest["model"]["tokenizer"])
    reference, described = reference_codec(folder, hf)
    items = texts()
    bos_id = manifest["model"]["config"].get("bos_token_id")
    bos = [bos_id] if bos_id is not None else []
    rows: list[dict[str, Any]] = []
    for codec in [hf_codec(hf), *_clients(artifact, manifest)]:
        if isinstance(codec, tuple):
            rows.append({"tokenizer": codec[0], "status": "skipped", "reason": codec[1]})
            continue
        row = _compare(codec, reference, items, bos)
        known = {k["label"]: "same" if codec.encode(k["text"]) == reference.encode(k["text"]) else "differs"
                 for k in texts("known_differences")}
        rows.append({**row, "known_differences": known})
    failed = [r for r in rows if r["status"] == "failed"]
    return {"status": "failed" if failed else "passed", "reference": described, "text_set": TEXTS_FILE,
            "texts": len(items), "tokenizers": rows, "failures": [_failure(r) for r in failed]}


def _failure(row: dict[str, Any]) -> dict[str, Any]:
    """A gate failure in the report's common form: the first text a tokenizer gets wrong."""
    m = row["first_mismatch"]
    if row["check"] == "encode":
        value, want = m["ids"], m["reference_ids"]
    else:
        value, want = m["decoded"], m["reference_decoded"]
    return {"metric": f"{row['tokenizer']} {row['check']}", "step": m["label"], "value": str(value),
            "threshold": str(want), "bound": "equal"}
