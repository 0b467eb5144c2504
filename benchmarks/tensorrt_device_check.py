"""One command for a GPU machine: build the tiny preset's TensorRT engine, validate it, print parity and
latency. Where TensorRT is missing it runs what CUDA parts it can and says plainly what it could not.

    python benchmarks/tensorrt_device_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str]) -> int:
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def show_report(artifact: Path) -> None:
    report = json.loads((artifact / "report.json").read_text())
    parity, latency = report["parity"], report["latency"]
    print(f"parity {parity['status']} at level {parity['level']} on {parity.get('measured_on')}: {parity.get('worst')}")
    if latency["status"] == "measured":
        for row in latency["prefill"]:
            print(f"  prefill T={row['tokens']}: {row['median_ms']:.3f} ms (p90 {row['p90_ms']:.3f})")
        for row in latency["decode"]:
            print(f"  decode fill={row['fill']}: {row['median_ms']:.3f} ms/token ({row['tokens_per_s']:.0f} tok/s)")


def cuda_proxy(artifact: Path) -> None:
    """The engine-ready ONNX on ONNX Runtime's CUDA EP, compared with the fp32 reference."""
    import onnxruntime as ort

    from exporter.manifest import read_manifest
    from targets.tensorrt.runner import OnnxProxyRunner
    from validation.gates import gates_for
    from validation.parity import compare, default_case
    from validation.reference import reference_runner, source_from_manifest

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("NOT RUN: ONNX Runtime's CUDA EP (onnxruntime-gpu is not installed)")
        return
    manifest = read_manifest(artifact)
    cfg, cache = manifest["model"]["config"], manifest["cache"]
    runner = OnnxProxyRunner(artifact, cache["capacity"], cache["window"], cfg["num_hidden_layers"],
                             (cfg["num_key_value_heads"], cfg["head_dim"]), "float16",
                             provider="CUDAExecutionProvider")
    case = default_case(runner.capacity, runner.window, cfg["vocab_size"])
    result = compare(reference_runner(manifest, source_from_manifest(manifest)), runner, case, gates_for("fp16"))
    print(f"ORT CUDA EP on the TensorRT ONNX: {'passed' if result.passed else 'failed'} {result.worst()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/device-check"))
    args = parser.parse_args()
    import torch

    from targets.tensorrt import _tensorrt_reason

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    reason = _tensorrt_reason()
    cli = [sys.executable, "-m", "mistral_export.entry"]
    engine = args.out / "tensorrt-fp16"
    if reason is None:
        code = run([*cli, "build", "--target", "tensorrt", "--precision", "fp16", "--out", str(engine), "--force"])
        show_report(engine)
        return code
    print(f"NOT RUN: TensorRT engine build and engine parity ({reason})")
    onnx = args.out / "tensorrt-onnx-fp16"
    code = run([*cli, "build", "--target", "tensorrt", "--onnx-only", "--precision", "fp16", "--out", str(onnx),
                "--force"])
    show_report(onnx)
    if torch.cuda.is_available():
        cuda_proxy(onnx)
        ref = args.out / "reference-cuda-fp16"
        code |= run([*cli, "build", "--target", "reference", "--device", "cuda", "--precision", "fp16",
                     "--out", str(ref), "--force"])
        show_report(ref)
    else:
        print("NOT RUN: every CUDA part (no GPU visible to torch)")
    return code


if __name__ == "__main__":
    sys.exit(main())
