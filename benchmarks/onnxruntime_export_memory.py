"""Peak RSS of an ONNX Runtime export against the weight bytes it writes.

Weights stream one tensor at a time (seeded random, generated per tensor like the presets), so the
peak should be the process baseline plus a few copies of the largest tensor, not a second model.
Each precision runs in a fresh process; validation is off (this measures the export alone).

    flock /tmp/heavy.lock python -m benchmarks.onnxruntime_export_memory --layers 16 --precisions fp32 int4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def export(out: Path, precision: str, layers: int, hidden: int) -> dict[str, float]:
    import torch

    from pipeline.build import BuildRequest, build
    from exporter.checkpoint import DTYPES, PresetWeights
    from exporter.config import MistralConfig
    from exporter.trace import TraceSpec, traced

    cfg = MistralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                        head_dim=64, sliding_window=4096, max_position_embeddings=32768)

    class Random(PresetWeights):
        def __init__(self) -> None:
            self.name, self.config, self.seed = "memory-check", cfg, 0

    source = Random()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dtype = DTYPES.get(precision, torch.float32)
    program = traced(TraceSpec(cfg, cfg.sliding_window or 0, dtype), use_cache=False)
    build(BuildRequest(target="onnxruntime", precision=precision, out=out), prepared=(source, program))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = (out / "model.onnx.data").stat().st_size / 2**20
    return {"baseline_mb": round(before), "peak_mb": round(peak), "weights_mb": round(weights),
            "peak_over_weights": round(peak / weights, 3), "increase_over_weights": round((peak - before) / weights, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(export(Path(tmp) / "artifact", args.one, args.layers, args.hidden)))
        return
    for precision in args.precisions:
        cmd = [sys.executable, "-m", "benchmarks.onnxruntime_export_memory", "--one", precision,
               "--layers", str(args.layers), "--hidden", str(args.hidden)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{precision:5} {result}")


if __name__ == "__main__":
    main()
