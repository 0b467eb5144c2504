"""Peak RSS, wall time and output size of `mistral-export build` per CPU target and precision, and of
the peers' exporters on the same checkpoint, each in its own child process measured by the OS
(GNU time's maximum resident set size).

    python benchmarks/export_memory.py --checkpoint /data/m7b --targets onnxruntime:fp16,onnxruntime:int4,openvino:fp16
    python benchmarks/export_memory.py --checkpoint /data/m1b --peers --genai-python .venv/bin/python \\
        --optimum-cli /work/venv-optimum/bin/optimum-cli
    python benchmarks/export_memory.py --checkpoint /data/m1b --adapter /data/m1b-lora   # with and without
    python benchmarks/export_memory.py --checkpoint /data/m7b --targets coreml:fp16,coreml:int4  # parts: auto

Prints a table with the ratio of peak RSS to the output's weight bytes (goal: <= 1.25x plus a small
constant for ONNX Runtime and OpenVINO).
"""

from __future__ import annotations

import argparse
import json
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


def largest_part_gb(out: Path) -> float | None:
    """A Core ML artifact's largest part, in fp32 weight bytes (the unit of its memory goal)."""
    from exporter.config import MistralConfig
    from targets.coreml.pipeline import part_fp32_bytes

    manifest = json.loads((out / "manifest.json").read_text())
    parts = manifest["target"].get("pipeline", {}).get("parts")
    if not parts:
        return None
    cfg = MistralConfig(**manifest["model"]["config"])
    return max(part_fp32_bytes(cfg, *p["layers"]) for p in parts) / 2**30


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
    part = largest_part_gb(out) if (out / "manifest.json").is_file() else None
    shutil.rmtree(out, ignore_errors=True)
    row: dict[str, float | str] = {"peak_rss_gb": peak_kb / 2**20, "wall_s": wall, "weights_gb": size / 2**30,
                                   "ratio": (peak_kb * 1024) / size if size else float("nan")}
    if part is not None:
        row["largest_part_fp32_gb"] = part
    return row


def ours(checkpoint: Path | None, target: str, precision: str, workdir: Path,
         adapter: Path | None = None, options: tuple[str, ...] = ()) -> dict[str, float | str]:
    out = workdir / f"ours-{target}-{precision}"
    source = ["--checkpoint", str(checkpoint)] if checkpoint is not None else ["--preset", "tiny"]
    cmd = [sys.executable, "-m", "mistral_export.entry", "build", "--target", target, "--precision", precision,
           *source, "--out", str(out), "--force", "--no-validate"]
    for option in options:
        cmd += ["--option", option]
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
    parser.add_argument("--option", action="append", default=[], metavar="TARGET:KEY=VALUE",
                        help="a target option for that target's builds, e.g. coreml:chunks=4 (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export-memory-"))
    options: dict[str, list[str]] = {}
    for option in args.option:
        target, _, setting = option.partition(":")
        options.setdefault(target, []).append(setting)
    rows = []
    targets = [pair.split(":") for pair in args.targets.split(",")]
    if any(t == "coreml" for t, _ in targets):
        # The process baseline of the Core ML goal: the same command on the tiny preset (imports, trace,
        # converter state), measured in this run.
        baseline = ours(None, "coreml", "fp16", workdir)
        print(f"baseline (coreml fp16 build of the tiny preset): {baseline}", flush=True)
    for target, precision in targets:
        rows.append((f"mistral-export {target}", precision,
                     ours(args.checkpoint, target, precision, workdir, options=tuple(options.get(target, ())))))
        print(f"{rows[-1][0]} {precision}: {rows[-1][2]}", flush=True)
        if args.adapter is not None:
            rows.append((f"mistral-export {target} + LoRA", precision,
                         ours(args.checkpoint, target, precision, workdir, args.adapter,
                              tuple(options.get(target, ())))))
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
    parts = [(name, precision, r) for name, precision, r in rows if "largest_part_fp32_gb" in r]
    if parts:
        base = float(baseline["peak_rss_gb"])
        print(f"\nCore ML goal: peak <= 1.25 x the largest part's fp32 weights + the baseline ({base:.2f} GiB)\n")
        print("| exporter | precision | largest part fp32 GiB | peak RSS GiB | (peak - baseline) / part | goal met |")
        print("|---|---|---|---|---|---|")
        for name, precision, r in parts:
            part = float(r["largest_part_fp32_gb"])
            factor = (float(r["peak_rss_gb"]) - base) / part
            print(f"| {name} | {precision} | {part:.2f} | {r['peak_rss_gb']:.2f} | {factor:.2f} | "
                  f"{'yes' if factor <= 1.25 else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
