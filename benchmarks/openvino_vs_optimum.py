"""Our OpenVINO artifacts against optimum-intel's export of the same checkpoint, on one runtime.

The checkpoint is a ~150M random Mistral (hidden 1024, 8 layers, 16/4 heads, vocab 32000, window 4096),
made in-process with seeded weights and saved as a local Hugging Face folder. optimum-intel lives in its
own venv (it pins transformers < 5.6) and is only used to export; both IRs then run in this process on
this process's openvino, with the same threads and PERFORMANCE_HINT=LATENCY.

Rows (like with like):
  f32        ours fp32 vs peer fp32 IR, both INFERENCE_PRECISION_HINT=f32 and KV_CACHE_PRECISION=f32
  bf16       ours bf16 vs peer fp32 IR at the CPU's default hints (nothing set)
  int4       ours int4 sym g128, every layer int4 (group_size=128: the peer's group) vs peer int4 as exported by
             default (--sym --group-size 128 --ratio 1.0: embedding and lm_head stay int8); default hints
  int4-same  ours with all_layers=false: the peer's exact nncf configuration
  int4-all   ours default vs peer with --all-layers: both every layer int4
Prefill: one chunk of T=128 and of T=512 from an empty cache. Decode: single tokens after a 128-token prompt.
Our side runs through its Runner (what users get); the peer through a bare infer request (its best case).
Effective bandwidth = bytes of the weights feeding MatMuls at the run's precision / ms per token.

    python -m benchmarks.openvino_vs_optimum --optimum-cli /path/to/optimum-venv/bin/optimum-cli
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = 128
PREFILLS = (128, 512)
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, sliding_window=4096, max_position_embeddings=32768,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
ROWS = {  # name: (our precision, our options, peer export, peer hints or None for "same as ours")
    "f32": ("fp32", (), "fp32", None),
    "bf16": ("bf16", (), "fp32", {}),
    "int4": ("int4", ("group_size=128",), "int4", {}),
    "int4-same": ("int4", ("group_size=128", "all_layers=false"), "int4", {}),
    "int4-all": ("int4", ("group_size=128",), "int4-all", {}),
}
INT4 = ["--weight-format", "int4", "--sym", "--group-size", "128", "--ratio", "1.0"]
PEER_EXPORT = {"fp32": ["--weight-format", "fp32"], "int4": INT4, "int4-all": [*INT4, "--all-layers"]}


def make_checkpoint(folder: Path, seed: int = 0) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**CONFIG)).eval()
    with torch.no_grad():  # transformers initialises with std 0.02 already; norms away from 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def export_ours(checkpoint: Path, out: Path, precision: str, options: tuple[str, ...], target: str = "openvino") -> None:
    if (out / "manifest.json").is_file():
        return
    run([sys.executable, "-m", "mistral_export.entry", "build", "--target", target, "--checkpoint", str(checkpoint),
         "--precision", precision, "--out", str(out), "--force", "--no-validate",
         *[arg for option in options for arg in ("--option", option)]])


def export_peer(optimum_cli: str, checkpoint: Path, out: Path, weight_format: str) -> None:
    if (out / "openvino_model.xml").is_file():
        return
    run([optimum_cli, "export", "openvino", "--model", str(checkpoint), "--task", "text-generation-with-past",
         *PEER_EXPORT[weight_format], str(out)])


def matmul_weight_bytes(xml: Path, float_bytes: int) -> int:
    """Bytes of the constants feeding MatMuls (the weights each token reads), floats at the run precision."""
    import openvino as ov

    model = ov.Core().read_model(xml)
    seen: set[str] = set()
    total = 0
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        stack = [op.input(1).get_source_output().get_node()]
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            if node.get_type_name() == "Constant":
                kind = node.get_output_element_type(0)
                count = int(np.prod(node.get_output_shape(0), dtype=np.int64))
                total += count * (float_bytes if kind.is_real() else kind.bitwidth / 8)
            elif node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
                stack += [i.get_source_output().get_node() for i in node.inputs()]
    return int(total)


class PeerRunner:
    """optimum-intel's stateful IR driven bare: input_ids, attention_mask, position_ids, beam_idx."""

    def __init__(self, compiled: Any) -> None:
        self.request = compiled.create_infer_request()
        self.names = {p.get_any_name() for p in compiled.inputs}

    def reset(self, batch: int) -> None:
        self.request.reset_state()
        self.length = 0

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        t = ids.shape[1]
        self.length += t
        inputs = {"input_ids": ids, "attention_mask": np.ones((1, self.length), dtype=np.int64),
                  "beam_idx": np.zeros(1, dtype=np.int32)}
        if "position_ids" in self.names:
            inputs["position_ids"] = positions
        self.request.infer(inputs)
        return self.request.get_tensor("logits").data


def time_prefill(runner: Any, ids: np.ndarray, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        runner.reset(1)
        start = time.perf_counter()
        runner.step(ids, np.arange(ids.shape[1], dtype=np.int64)[None])
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def time_decode(runner: Any, ids: np.ndarray, steps: int, warmup: int = 2) -> list[float]:
    from validation.latency import decode_seconds

    runner.reset(1)
    runner.step(ids, np.arange(PROMPT, dtype=np.int64)[None])
    return [s * 1e3 for s in decode_seconds(runner, PROMPT, steps, warmup)]


def open_ours(artifact: Path, threads: int) -> tuple[Any, dict[str, str]]:
    from targets import registry

    manifest, runner = registry.load_runner(artifact)
    if runner.threads != threads:
        raise SystemExit(f"ours runs {runner.threads} threads, expected {threads}; rebuild with --option threads=")
    return runner, manifest["target"]["runtime_hints"]


def open_peer(xml: Path, hints: dict[str, str], threads: int) -> tuple[Any, Any]:
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads), **hints}
    compiled = core.compile_model(core.read_model(xml), "CPU", config)
    return PeerRunner(compiled), compiled


def resolved(compiled: Any) -> str:
    return (f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}/"
            f"{compiled.get_property('KV_CACHE_PRECISION').get_type_name()}")


def bench_row(name: str, ours_dir: Path, peer_xml: Path, peer_hints: dict[str, str] | None, threads: int,
              rounds: int, steps: int) -> dict[str, Any]:
    ours, our_hints = open_ours(ours_dir, threads)
    peer, compiled = open_peer(peer_xml, our_hints if peer_hints is None else peer_hints, threads)
    prompts = {n: np.random.default_rng(0).integers(3, 32000, (1, n)).astype(np.int64) for n in PREFILLS}
    ids = prompts[PROMPT]
    result: dict[str, list[float]] = {f"{side}_{k}": [] for side in ("ours", "peer")
                                      for k in [*(f"prefill{n}" for n in PREFILLS), "decode"]}
    for _ in range(rounds):  # interleaved, so a busy neighbour slows both sides alike
        for n, prompt in prompts.items():
            result[f"ours_prefill{n}"].append(time_prefill(ours, prompt, 3))
            result[f"peer_prefill{n}"].append(time_prefill(peer, prompt, 3))
        result["ours_decode"] += time_decode(ours, ids, steps)
        result["peer_decode"] += time_decode(peer, ids, steps)
    med = {k: statistics.median(v) for k, v in result.items()}
    # The 10th percentile as well: on a shared machine noise only ever adds time.
    p10 = {k: float(np.percentile(v, 10)) for k, v in result.items() if k.endswith("decode")}
    ours_precision = ours.describe_device()["inference_precision"]
    peer_precision = resolved(compiled)
    float_bytes = lambda p: 4 if p.startswith("f32") else 2  # noqa: E731
    ours_bytes = matmul_weight_bytes(ours_dir / "openvino_model.xml", float_bytes(ours_precision))
    peer_bytes = matmul_weight_bytes(peer_xml, float_bytes(peer_precision))
    return {"row": name, "ours_hints": f"{ours_precision}/{ours.describe_device()['kv_cache_precision']}",
            "peer_hints": peer_precision, **{k: round(v, 3) for k, v in med.items()},
            **{f"prefill{n}_ratio": round(med[f"ours_prefill{n}"] / med[f"peer_prefill{n}"], 3) for n in PREFILLS},
            "decode_ratio": round(med["ours_decode"] / med["peer_decode"], 3),
            "ours_decode_p10": round(p10["ours_decode"], 3), "peer_decode_p10": round(p10["peer_decode"], 3),
            "decode_ratio_p10": round(p10["ours_decode"] / p10["peer_decode"], 3),
            "ours_weight_mb": round(ours_bytes / 1e6, 1), "peer_weight_mb": round(peer_bytes / 1e6, 1),
            "ours_gb_s": round(ours_bytes / med["ours_decode"] / 1e6, 1),
            "peer_gb_s": round(peer_bytes / med["peer_decode"] / 1e6, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| row | hints ours / peer | prefill T=128 ms ours / peer (ratio) | prefill T=512 ms ours / peer (ratio) "
            "| decode@128 ms median ours / peer (ratio) | decode p10 ratio | weight MB/token ours / peer "
            "| GB/s ours / peer |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['row']} | {r['ours_hints']} / {r['peer_hints']} "
             + "".join(f"| {r[f'ours_prefill{n}']:.1f} / {r[f'peer_prefill{n}']:.1f} ({r[f'prefill{n}_ratio']:.2f}x) "
                       for n in PREFILLS)
             + f"| {r['ours_decode']:.2f} / {r['peer_decode']:.2f} ({r['decode_ratio']:.2f}x) "
             f"| {r['decode_ratio_p10']:.2f}x | {r['ours_weight_mb']:.0f} / {r['peer_weight_mb']:.0f} "
             f"| {r['ours_gb_s']:.1f} / {r['peer_gb_s']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mistral-export-bench"))
    parser.add_argument("--optimum-cli", default="optimum-cli", help="optimum-cli of the venv holding optimum-intel")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    checkpoint = args.workdir / "checkpoint"
    make_checkpoint(checkpoint)
    rows = []
    for name in args.rows.split(","):
        precision, options, peer_format, peer_hints = ROWS[name]
        ours_dir = args.workdir / f"ours-{precision}{'-' if options else ''}{'-'.join(options).replace('=', '')}"
        peer_dir = args.workdir / f"peer-{peer_format}"
        export_ours(checkpoint, ours_dir, precision, options)
        export_peer(args.optimum_cli, checkpoint, peer_dir, peer_format)
        rows.append(bench_row(name, ours_dir, peer_dir / "openvino_model.xml", peer_hints, args.threads,
                              args.rounds, args.decode_steps))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
