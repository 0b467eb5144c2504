"""Peak RSS, wall time and output size of `mistral-export build` per CPU target and precision, and of
the peers' exporters on the same checkpoint, each in its own child process measured by the OS
(GNU time's maximum resident set size).

    python benchmarks/export_memory.py --checkpoint /data/m7b --targets onnxruntime:fp16,onnxruntime:int4,openvino:fp16
    python benchmarks/export_memory.py --checkpoint /data/m1b --peers --genai-python .venv/bin/python \\
        --optimum-cli /work/venv-optimum/bin/optimum-cli
    python benchmarks/export_memory.py --checkpoint /data/m1b --adapter /data/m1b-lora   # with and without

Prints a table with the ratio of peak RSS to the output's weight bytes (goal: <= 1.25x plus a small
constant for ONNX Runtime and OpenVINO).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WEIGHT_SUFFIXES = (".data", ".bin", ".onnx", ".safetensors", ".weights", ".pt2")


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight-carrying files (model graphs with their external data), not reports."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()
               and (p.suffix in WEIGHT_SUFFIXES or "weights" in p.parts))


def measure(cmd: list[str], out: Path) -> dict[str, float | str]:
    """Run cmd under GNU time; peak RSS from the kernel's accounting of that child."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", stats.name, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_kb = int(stats.read().strip().splitlines()[-1])
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1][:200] if lines else f"exit code {proc.returncode} (killed by the OS, e.g. out of memory?)"
        return {"error": reason, "wall_s": wall, "peak_rss_gb": peak_kb / 2**20}
    if not out.is_dir():  # a command that exits 0 without writing must not read as a zero-byte build
        return {"error": f"exit code 0 but nothing was written at {out}", "wall_s": wall, "peak_rss_gb": peak_kb / 2**20}
    size = weight_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"peak_rss_gb": peak_kb / 2**20, "wall_s": wall, "weights_gb": size / 2**30,
            "ratio": (peak_kb * 1024) / size if size else float("nan")}


def ours(checkpoint: Path, target: str, precision: str, workdir: Path,
         adapter: Path | None = None) -> dict[str, float | str]:
    out = workdir / f"ours-{target}-{precision}"
    cmd = [sys.executable, "-m", "mistral_export.entry", "build", "--target", target, "--precision", precision,
           "--checkpoint", str(checkpoint), "--out", str(out), "--force", "--no-validate"]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    if target == "tensorrt":  # the engine needs a GPU; the export is the engine-ready ONNX
        cmd.append("--onnx-only")
    return measure(cmd, out)


def genai_peer(python: str, checkpoint: Path, precision: str, workdir: Path) -> dict[str, float | str]:
    out = workdir / f"genai-{precision}"
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(workdir / "genai-cache")]
    return measure(cmd, out)


def optimum_peer(cli: str, checkpoint: Path, weight_format: str, workdir: Path) -> dict[str, float | str]:
    out = workdir / f"optimum-{weight_format}"
    cmd = [cli, "export", "openvino", "--model", str(checkpoint), "--task", "text-generation-with-past",
           "--weight-format", weight_format, str(out)]
    return measure(cmd, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--targets", default="onnxruntime:fp16,onnxruntime:int4,openvino:fp16,openvino:int4",
                        help="comma-separated target:precision pairs")
    parser.add_argument("--peers", action="store_true", help="also run the peers' exporters")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="also build each target with this LoRA adapter merged (benchmarks/make_adapter.py)")
    parser.add_argument("--genai-python", default=sys.executable, help="python with onnxruntime-genai")
    parser.add_argument("--optimum-cli", default="optimum-cli", help="optimum-cli of a venv with optimum-intel")
    parser.add_argument("--optimum-checkpoint", type=Path, default=None,
                        help="the checkpoint for optimum-intel if it differs (e.g. a config.json without "
                             "layer_types, which optimum-intel 2.2 refuses)")
    parser.add_argument("--peer-precisions", default="fp16,int8,int4")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export-memory-"))
    rows = []
    for pair in args.targets.split(","):
        target, precision = pair.split(":")
        rows.append((f"mistral-export {target}", precision, ours(args.checkpoint, target, precision, workdir)))
        print(f"{rows[-1][0]} {precision}: {rows[-1][2]}", flush=True)
        if args.adapter is not None:
            rows.append((f"mistral-export {target} + LoRA", precision,
                         ours(args.checkpoint, target, precision, workdir, args.adapter)))
            print(f"{rows[-1][0]} {precision}: {rows[-1][2]}", flush=True)
    if args.peers:
        precisions = args.peer_precisions.split(",")
        for precision in precisions:
            rows.append(("onnxruntime-genai builder", precision,
                         genai_peer(args.genai_python, args.checkpoint, precision, workdir)))
            print(f"{rows[-1][0]} {precision}: {rows[-1][2]}", flush=True)
        for fmt in precisions:
            rows.append(("optimum-intel", fmt, optimum_peer(args.optimum_cli, args.optimum_checkpoint or args.checkpoint,
                                                            fmt, workdir)))
            print(f"{rows[-1][0]} {fmt}: {rows[-1][2]}", flush=True)
    print(f"\ncheckpoint {args.checkpoint}\n")
    print("| exporter | precision | peak RSS GiB | output weights GiB | RSS / weights | wall s |")
    print("|---|---|---|---|---|---|")
    for name, precision, r in rows:
        if "error" in r:
            print(f"| {name} | {precision} | failed at {r.get('peak_rss_gb', 0):.2f}: {r['error']} | | | "
                  f"{r['wall_s']:.0f} |")
        else:
            print(f"| {name} | {precision} | {r['peak_rss_gb']:.2f} | {r['weights_gb']:.2f} | {r['ratio']:.2f}x | "
                  f"{r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
