"""Wall time of one multi-target build (one trace) against separate builds of the same targets, both
without the trace cache, so the separate builds each trace again.

    python benchmarks/multi_target_build.py [--targets onnxruntime,openvino,coreml] [--preset tiny]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnxruntime,openvino,coreml")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "mistral_export.entry", "build", "--preset", args.preset, "--no-cache",
           "--no-validate", "--force", "--precision", "fp32"]
    together, separate = [], []
    for _ in range(args.rounds):  # interleaved rounds, so drift hits both alike
        with tempfile.TemporaryDirectory() as out:
            together.append(timed([*cli, "--target", args.targets, "--out", out]))
        with tempfile.TemporaryDirectory() as out:
            separate.append(sum(timed([*cli, "--target", t, "--out", f"{out}/{t}"]) for t in args.targets.split(",")))
    best_t, best_s = min(together), min(separate)
    print(f"targets {args.targets} on preset {args.preset}, best of {args.rounds}:")
    print(f"  one multi-target build: {best_t:.1f} s")
    print(f"  separate builds:        {best_s:.1f} s  ({best_s / best_t:.2f}x the multi-target build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
