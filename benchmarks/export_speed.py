"""ONNX Runtime export wall time and peak RSS: ours on a first build and on a second build of the same
shape (the lowered-graph cache warm), against onnxruntime-genai's model builder, in one run.

The checkpoint is the ~155M random Mistral of benchmarks/onnxruntime_vs_genai.py. Every build is its
own process under GNU time (export_memory.measure). Both of our builds start from a cached trace, as
a build matrix's jobs do; "first" empties the graph cache before it. The three builds alternate round
by round, so load from other processes hits them alike; figures are medians over the rounds.

    flock /tmp/heavy.lock python -m benchmarks.export_speed --precisions fp16 int4 --rounds 3
    python -m benchmarks.export_speed --checkpoint /data/m1b   # make_checkpoint.py --layers 4: 1.1B, 7B dims
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

from benchmarks.export_memory import genai_peer, ours
from benchmarks.onnxruntime_vs_genai import make_checkpoint

KINDS = ("ours-first", "ours-second", "builder")


def one_round(checkpoint: Path, precision: str, work: Path, cache: Path) -> dict[str, dict[str, Any]]:
    shutil.rmtree(cache / "onnx-graphs", ignore_errors=True)  # our own temporary cache folder
    first = ours(checkpoint, "onnxruntime", precision, work)
    second = ours(checkpoint, "onnxruntime", precision, work)
    shutil.rmtree(work / "genai-cache", ignore_errors=True)
    return {"ours-first": first, "ours-second": second, "builder": genai_peer(sys.executable, checkpoint, precision, work)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp16", "int4"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a Hugging Face folder to build instead of the ~155M random checkpoint")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        root = Path(tmp)
        checkpoint, cache, work = root / "ckpt", root / "cache", root / "work"
        if args.checkpoint is not None:
            checkpoint = args.checkpoint
        else:
            make_checkpoint(checkpoint, window=4096, seed=0)
        os.environ["MISTRAL_EXPORT_CACHE"] = str(cache)
        work.mkdir()
        seed = ours(checkpoint, "onnxruntime", "fp32", work)  # puts the trace in the cache
        if "error" in seed:
            raise SystemExit(f"seeding build failed: {seed['error']}")
        rows: list[dict[str, Any]] = []
        for precision in args.precisions:
            runs = [one_round(checkpoint, precision, work, cache) for _ in range(args.rounds)]
            for kind in KINDS:
                errors = [r[kind]["error"] for r in runs if "error" in r[kind]]
                if errors:
                    rows.append({"precision": precision, "kind": kind, "error": errors[0]})
                    continue
                rows.append({"precision": precision, "kind": kind,
                             "wall_s": statistics.median(r[kind]["wall_s"] for r in runs),
                             "peak_rss_gb": statistics.median(r[kind]["peak_rss_gb"] for r in runs),
                             "walls": [round(r[kind]["wall_s"], 2) for r in runs]})
    print("| precision | build | wall s (median) | x builder | peak RSS GiB | walls |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['precision']} | {row['kind']} | error: {row['error']} | | | |")
            continue
        peer = next(r for r in rows if r["precision"] == row["precision"] and r["kind"] == "builder")
        ratio = row["wall_s"] / peer["wall_s"] if "wall_s" in peer else float("nan")
        print(f"| {row['precision']} | {row['kind']} | {row['wall_s']:.1f} | {ratio:.2f} | "
              f"{row['peak_rss_gb']:.2f} | {row['walls']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
