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
from validation.tokenizers import Codec, genai_codec, hf_codec, openvino_codec, reference_codec, texts


def codecs(name: str, work: Path) -> tuple[Codec, list[Codec | tuple[str, str]]]:
    folder = work / "tokenizer"
    write_hf_files(packaged(name), folder, version_of(name))
    hf = load_tokenizer(folder)
    reference, _ = reference_codec(folder, hf)
    write_genai_config(work, genai_config(preset("mistral-7b-v0.1"), "model.onnx", 4096, None, "cpu"))
    place_tokenizer(folder, work)
    out: list[Codec | tuple[str, str]] = [hf_codec(hf)]
    og = genai_codec(work)
    out.append(og if isinstance(og, Codec) else ("onnxruntime-genai", og))
    ir = write_tokenizer(folder, work)
    ov = openvino_codec(work, tuple(ir["files"])) if ir["status"] == "converted" else ir["reason"]
    out.append(ov if isinstance(ov, Codec) else ("openvino-tokenizers", ov))
    return reference, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    items = [(t, True) for t in texts()] + [(t, False) for t in texts("known_differences")]
    failed = 0
    for name in sorted(set(PRESET_TOKENIZERS.values())):
        with tempfile.TemporaryDirectory() as tmp:
            reference, clients = codecs(name, Path(tmp))
            names = [c.name if isinstance(c, Codec) else c[0] for c in clients]
            print(f"\n{name} (reference: mistral-common)\n")
            print("| text | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for item, gated in items:
                cells = []
                want = reference.encode(item["text"])
                bos = [1]
                for c in clients:
                    if not isinstance(c, Codec):
                        cells.append(f"skipped ({c[1]})")
                        continue
                    got = c.encode(item["text"])
                    if got != want:
                        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                        cells.append(f"encode differs at {at}: {got[at:at + 3]} vs {want[at:at + 3]}")
                        failed += gated
                    elif c.decode(bos + want) != reference.decode(bos + want):
                        cells.append("decode differs")
                        failed += gated
                    else:
                        cells.append("ok")
                label = item["label"] + ("" if gated else " (known difference, not gated)")
                print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{failed} gated mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
