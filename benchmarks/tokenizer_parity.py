"""The tokenizer-parity table: each tokenizer an artifact can carry x the packaged text set, against
mistral-common, for Mistral's v1 and v3 tokenizers. No model is built: the files are written as a build
writes them (exporter/tokenizer.py), beside a genai_config.json for onnxruntime-genai and converted with
openvino-tokenizers as the OpenVINO target converts them.

    python -m benchmarks.tokenizer_parity [--markdown]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from exporter.config import preset
from exporter.tokenizer import PRESET_TOKENIZERS, packaged, version_of, write_hf_files
from targets.onnxruntime.genai import genai_config, place_tokenizer, write_genai_config
from targets.openvino.tokenizer import write_tokenizer
from validation.text import load_tokenizer
from validation.tokenizers import (Codec, Skipped, genai_codec, hf_codec, mismatch, openvino_codec,
                                  reference_codec, texts)


def codecs(name: str, work: Path) -> tuple[Codec, list[int], list[Codec | Skipped]]:
    """The reference, BOS and every client tokenizer for one Mistral tokenizer file, written as a build writes them."""
    folder = work / "tokenizer"
    write_hf_files(packaged(name), folder, version_of(name))
    hf = load_tokenizer(folder)
    reference, _ = reference_codec(folder, hf)
    write_genai_config(work, genai_config(preset("mistral-7b-v0.1"), "model.onnx", 4096, None, "cpu"))
    place_tokenizer(folder, work)
    ir = write_tokenizer(folder, work)
    ov = openvino_codec(work, tuple(ir["files"])) if ir["status"] == "converted" else ("openvino-tokenizers", ir["reason"])
    return reference, [hf.bos_token_id], [hf_codec(hf), genai_codec(work), ov]


def cell(codec: Codec | Skipped, reference: Codec, text: str, bos: list[int]) -> str:
    if not isinstance(codec, Codec):
        return f"skipped ({codec[1]})"
    found = mismatch(codec, reference, text, bos)
    if found is None:
        return "ok"
    if found["check"] == "decode":
        return "decode differs"
    at, shown = found["at"], min(found["at"], 3)  # the mismatch's id windows start 3 before `at`
    return (f"encode differs at {at}: {found['ids'][shown:shown + 3]} vs "
            f"{found['reference_ids'][shown:shown + 3]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    items = [(t, True) for t in texts()] + [(t, False) for t in texts("known_differences")]
    failed = 0
    for name in sorted(set(PRESET_TOKENIZERS.values())):
        with tempfile.TemporaryDirectory() as tmp:
            reference, bos, clients = codecs(name, Path(tmp))
            names = [c.name if isinstance(c, Codec) else c[0] for c in clients]
            print(f"\n{name} (reference: mistral-common)\n")
            print("| text | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for item, gated in items:
                cells = [cell(c, reference, item["text"], bos) for c in clients]
                failed += gated * sum(c != "ok" and not c.startswith("skipped") for c in cells)
                label = item["label"] + ("" if gated else " (known difference, not gated)")
                print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{failed} gated mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
