"""Does `bench` report what a bare client measures on the same artifact? And how long does it take?

For the ~150M random Mistral of benchmarks/onnxruntime_vs_genai.py (window 4096), per target:
- `mistral-export bench ARTIFACT --json` with its defaults, wall-timed (goal: under a minute);
- the same decode fills driven by the runtime's own client on the same artifact: onnxruntime-genai's
  Generator (append the prompt, time each generate_next_token; max_length = our buffer's rows) for
  onnxruntime, and a bare InferRequest on the stateful IR, compiled with the artifact's runtime hints,
  for openvino (input_ids, attention_mask, position_ids, beam_idx);
- the ratio of our decode ms/token to the client's at each fill (goal: within 5 %).

The client's step includes its own search (argmax over the vocabulary), ours times the model step
alone, so a ratio a little under 1 is expected. Both sides get the same intra-op threads (--threads);
bench runs in its own process, the client in this one, one after the other.

    python -m benchmarks.bench_overhead --targets onnxruntime,openvino --workdir /tmp/bench-overhead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.onnxruntime_vs_genai import make_checkpoint

STEPS, WARMUP = 16, 2


def run_bench(artifact: Path, threads: int) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mistral_export.entry", "bench", str(artifact), "--json",
                           "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout), time.perf_counter() - start


def genai_decode_ms(artifact: Path, fill: int, threads: int) -> float:
    import onnxruntime_genai as og

    config = og.Config(str(artifact))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    # og sizes its shared past/present buffer by max_length: the rows our runner's buffer has (window +
    # slack), so both attend over the same buffer (GQA's window cache must hold the whole window).
    rows = json.loads((artifact / "manifest.json").read_text())["target"]["cache_buffer_rows"]
    params.set_search_options(do_sample=False, max_length=rows)
    generator = og.Generator(model, params)
    generator.append_tokens(np.random.default_rng(7).integers(3, 32000, fill).astype(np.int32))
    samples = []
    for s in range(WARMUP + STEPS):
        start = time.perf_counter()
        generator.generate_next_token()
        if s >= WARMUP:
            samples.append(time.perf_counter() - start)
    return 1000 * float(np.median(samples))


def openvino_decode_ms(artifact: Path, fill: int, threads: int) -> float:
    import openvino as ov

    # The runtime hints the artifact records (our runner compiles with them; without them the CPU plugin
    # may pick another inference precision, which is a different computation).
    hints = json.loads((artifact / "manifest.json").read_text())["target"]["runtime_hints"]
    compiled = ov.Core().compile_model(str(artifact / "openvino_model.xml"), "CPU",
                                       {**hints, "INFERENCE_NUM_THREADS": str(threads)})
    request = compiled.create_infer_request()
    request.reset_state()

    def step(ids: np.ndarray, start_pos: int) -> None:
        n = ids.shape[1]
        request.infer({"input_ids": ids, "attention_mask": np.ones((1, start_pos + n), dtype=np.int64),
                       "position_ids": np.arange(start_pos, start_pos + n, dtype=np.int64)[None],
                       "beam_idx": np.zeros(1, dtype=np.int32)})

    step(np.random.default_rng(7).integers(3, 32000, (1, fill)).astype(np.int64), 0)
    samples = []
    for s in range(WARMUP + STEPS):
        start = time.perf_counter()
        step(np.ones((1, 1), dtype=np.int64), fill + s)
        if s >= WARMUP:
            samples.append(time.perf_counter() - start)
    return 1000 * float(np.median(samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnxruntime,openvino")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-overhead"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the same on both sides")
    args = parser.parse_args()
    checkpoint = args.workdir / "m150m"
    if not (checkpoint / "config.json").is_file():
        make_checkpoint(checkpoint, window=4096, seed=0)
    rows = []
    for target in args.targets.split(","):
        artifact = args.workdir / f"ours-{target}"
        if not (artifact / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "mistral_export.entry", "build", "--target", target,
                            "--checkpoint", str(checkpoint), "--out", str(artifact), "--no-validate"], check=True)
        # Rounds alternate bench and client, so load from other work hits both alike; medians over rounds.
        ours: dict[int, list[float]] = {}
        theirs: dict[int, list[float]] = {}
        walls = []
        for _ in range(args.rounds):
            report, wall = run_bench(artifact, args.threads)
            walls.append(wall)
            for row in report["latency"]["decode"]:
                ours.setdefault(row["fill"], []).append(row["median_ms"])
                theirs.setdefault(row["fill"], []).append(
                    genai_decode_ms(artifact, row["fill"], args.threads) if target == "onnxruntime"
                    else openvino_decode_ms(artifact, row["fill"], args.threads))
        lat = report["latency"]
        for fill in sorted(ours):
            rows.append((target, fill, float(np.median(ours[fill])), float(np.median(theirs[fill])), walls))
        print(f"{target}: bench with its defaults took {', '.join(f'{w:.1f}' for w in walls)} s (prefill "
              f"{[r['tokens'] for r in lat['prefill']]}, fills {sorted(ours)}, {args.threads} threads)", flush=True)
    print("\n| target | fill | bench decode ms | client decode ms | ratio | within 5 % |")
    print("|---|---|---|---|---|---|")
    for target, fill, ours, theirs, _ in rows:
        ratio = ours / theirs
        print(f"| {target} | {fill} | {ours:.3f} | {theirs:.3f} | {ratio:.3f} | {'yes' if abs(ratio - 1) <= 0.05 else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
