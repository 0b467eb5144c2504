"""Wall time of a 2 x 2 build matrix (each job: build + validation with latency) on the local and the
Ray executor, against the same four builds run one after another, all in one run. Each side starts
with an empty trace cache; the Ray side includes starting its local cluster. Then a second matrix
run (every job skipped), and `report merge` of two of the reports.

    python benchmarks/matrix_wall.py [--targets onnxruntime,openvino] [--precisions fp32,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gate_calibration import calibration_checkpoint  # noqa: E402

CLI = [sys.executable, "-m", "mistral_export.entry"]


def timed(cmd: list[str], cache: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MISTRAL_EXPORT_CACHE": str(cache)})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnxruntime,openvino")
    parser.add_argument("--precisions", default="fp32,int8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = str(calibration_checkpoint(root / "tiny-512"))
        pairs = [(t, p) for t in args.targets.split(",") for p in args.precisions.split(",")]
        separate = sum(timed([*CLI, "build", "--target", t, "--precision", p, "--checkpoint", checkpoint,
                              "--out", str(root / "separate" / f"{t}-{p}")], root / "cache-separate")
                       for t, p in pairs)
        matrix = [*CLI, "matrix", "--target", args.targets, "--precision", args.precisions, "--checkpoint", checkpoint]
        local = timed([*matrix, "--out", str(root / "local")], root / "cache-local")
        remote = timed([*matrix, "--out", str(root / "ray"), "--executor", "ray"], root / "cache-ray")
        rows = json.loads((root / "local" / "matrix.json").read_text())["jobs"]
        again = timed([*matrix, "--out", str(root / "local")], root / "cache-local")
        print(f"{len(pairs)} jobs ({args.targets} x {args.precisions}, build + validation + latency), "
              f"{os.cpu_count()} cores:")
        print(f"  separate builds, one after another: {separate:6.1f} s")
        print(f"  matrix, local executor:             {local:6.1f} s  ({separate / local:.2f}x faster)")
        print(f"  matrix, Ray executor (local cluster, start included): {remote:6.1f} s  ({separate / remote:.2f}x)")
        print(f"  matrix rerun, every job skipped:    {again:6.1f} s")
        print("\nper job (local executor):")
        for r in rows:
            print(f"  {r['job']:36s} {r['status']:8s} wall {r['wall_s']:5.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"decode {r.get('decode_ms', float('nan')):.3f} ms/token")
        merged = root / "merged"
        subprocess.run([*CLI, "report", "merge", rows[0]["artifact"], rows[2]["artifact"], "--out", str(merged)],
                       check=True, capture_output=True)
        print("\n" + (merged / "merged.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
