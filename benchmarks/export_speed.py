"""Export wall time and peak RSS: ours on a first build and on a second build of the same shape (the
lowered-graph caches warm), against the target's peer exporter (ONNX Runtime: onnxruntime-genai's model
builder; OpenVINO: optimum-intel), in one run.

The checkpoint is the ~155M random Mistral of benchmarks/onnxruntime_vs_genai.py, or --checkpoint. Every
build is its own process under GNU time (export_memory.measure). Both of our builds start from a cached
trace, as a build matrix's jobs do (one seeding build per precision puts it there); "first" empties the
lowered-graph caches (OpenVINO's tokenizer IRs too) before it. The three builds alternate round by
round, so load from other processes hits them alike; figures are medians over the rounds.

    flock /tmp/heavy.lock python -m benchmarks.export_speed --precisions fp16 int4 --rounds 3
    python -m benchmarks.export_speed --checkpoint /data/m1b   # make_checkpoint.py --layers 4: 1.1B, 7B dims
    python -m benchmarks.export_speed --target openvino --optimum-cli <venv>/bin/optimum-cli
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.export_memory import genai_peer, optimum_peer, ours
from benchmarks.int4_table import optimum_checkpoint
from benchmarks.onnxruntime_vs_genai import make_checkpoint

KINDS = ("ours-first", "ours-second", "peer")
# The lowered-graph caches a first build starts without (OpenVINO's tokenizer IRs too).
GRAPHS = {"onnxruntime": ("onnx-graphs",), "openvino": ("openvino-graphs", "openvino-tokenizers")}


def one_round(target: str, checkpoint: Path, precision: str, work: Path, cache: Path,
              optimum_cli: str | None) -> dict[str, dict[str, Any]]:
    for folder in GRAPHS[target]:
        shutil.rmtree(cache / folder, ignore_errors=True)  # our own temporary cache folder
    first = ours(checkpoint, target, precision, work)
    second = ours(checkpoint, target, precision, work)
    if target == "onnxruntime":
        shutil.rmtree(work / "genai-cache", ignore_errors=True)
        peer = genai_peer(sys.executable, checkpoint, precision, work)
    else:
        assert optimum_cli is not None
        peer = optimum_peer(optimum_cli, optimum_checkpoint(checkpoint, work), precision, work)
    return {"ours-first": first, "ours-second": second, "peer": peer}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp16", "int4"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a Hugging Face folder to build instead of the ~155M random checkpoint")
    ap.add_argument("--target", choices=sorted(GRAPHS), default="onnxruntime")
    ap.add_argument("--optimum-cli", default=None, help="OpenVINO's peer: optimum-cli of a venv with optimum-intel")
    args = ap.parse_args()
    if args.target == "openvino" and not args.optimum_cli:
        raise SystemExit("--target openvino needs --optimum-cli")
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        root = Path(tmp)
        checkpoint, cache, work = root / "ckpt", root / "cache", root / "work"
        if args.checkpoint is not None:
            checkpoint = args.checkpoint
        else:
            make_checkpoint(checkpoint, window=4096, seed=0)
        os.environ["MISTRAL_EXPORT_CACHE"] = str(cache)
        work.mkdir()
        rows: list[dict[str, Any]] = []
        for precision in args.precisions:
            seed = ours(checkpoint, args.target, precision, work)  # puts the trace in the cache
            if "error" in seed:
                raise SystemExit(f"seeding build failed: {seed['error']}")
            runs = [one_round(args.target, checkpoint, precision, work, cache, args.optimum_cli)
                    for _ in range(args.rounds)]
            for kind in KINDS:
                errors = [r[kind]["error"] for r in runs if "error" in r[kind]]
                if errors:
                    rows.append({"precision": precision, "kind": kind, "error": errors[0]})
                    continue
                rows.append({"precision": precision, "kind": kind,
                             "wall_s": statistics.median(r[kind]["wall_s"] for r in runs),
                             "peak_rss_gb": statistics.median(r[kind]["peak_rss_gb"] for r in runs),
                             "walls": [round(r[kind]["wall_s"], 2) for r in runs]})
    print(f"| precision | build | wall s (median) | x peer | peak RSS GiB | walls |  ({args.target})")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['precision']} | {row['kind']} | error: {row['error']} | | | |")
            continue
        peer = next(r for r in rows if r["precision"] == row["precision"] and r["kind"] == "peer")
        ratio = row["wall_s"] / peer["wall_s"] if "wall_s" in peer else float("nan")
        print(f"| {row['precision']} | {row['kind']} | {row['wall_s']:.1f} | {ratio:.2f} | "
              f"{row['peak_rss_gb']:.2f} | {row['walls']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
