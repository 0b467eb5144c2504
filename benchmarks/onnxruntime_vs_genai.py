"""Our ONNX Runtime artifact against onnxruntime-genai's model builder, same checkpoint, same ORT.

A seeded random Mistral (~150M: hidden 1024, 8 layers, 16/4 heads, vocab 32000, sliding window) is
written as a Hugging Face folder with a tokenizer and ``layer_types`` (without them the builder
drops the window). Both artifacts are driven by the same harness: an InferenceSession with the same
threads, IO binding and a shared, window-sized past/present buffer of the same rows
(targets/onnxruntime/runner.py; the builder's graph has the same IO names minus position_ids).
Each model lives in its own worker process (so peak RSS is per model); rounds interleave the
models and every figure is the median over rounds of each round's median.

    flock /tmp/heavy.lock python -m benchmarks.onnxruntime_vs_genai --precisions fp32 int4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HF_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def make_checkpoint(folder: Path, window: int, seed: int) -> None:
    """Seeded random MistralForCausalLM with layer_types, plus a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(**HF_CONFIG, sliding_window=window, layer_types=["sliding_attention"] * 8)
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(cfg.vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def build_ours(checkpoint: Path, out: Path, precision: str) -> None:
    from exporter.build import BuildRequest, build

    build(BuildRequest(target="onnxruntime", checkpoint=checkpoint, precision=precision, out=out))


def build_peer(checkpoint: Path, out: Path, precision: str) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out / "cache")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def weight_bytes(model_file: Path) -> int:
    """Bytes of every initializer a decode step reads: all but the ones feeding a Gather (the
    embedding, of which a step reads one row)."""
    import onnx

    m = onnx.load(str(model_file), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    total = 0
    for t in m.graph.initializer:
        if t.name in gathered:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def _worker(conn: Any, model_dir: str, threads: int, capacity: int, window: int, rows: int) -> None:
    from targets.onnxruntime.runner import GqaRunner, session

    import onnx

    m = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    past = next(i for i in m.graph.input if i.name == "past_key_values.0.key")
    dims = past.type.tensor_type.shape.dim
    elem = {1: "fp32", 10: "fp16"}[past.type.tensor_type.elem_type]
    cache = {"num_layers": HF_CONFIG["num_hidden_layers"], "kv_heads": dims[1].dim_value,
             "head_dim": dims[3].dim_value or HF_CONFIG["hidden_size"] // HF_CONFIG["num_attention_heads"],
             "dtype": elem}
    runner = GqaRunner(session(Path(model_dir) / "model.onnx", "cpu", threads), "cpu", capacity, window,
                       cache, threads, rows, None)
    rng = np.random.default_rng(0)
    while (msg := conn.recv()) is not None:
        kind, n, reps = msg
        samples = []
        if kind == "prefill":
            ids = rng.integers(3, 32000, (1, n))
            for _ in range(reps + 1):
                runner.reset(1)
                start = time.perf_counter()
                runner.step(ids, np.arange(n)[None])
                samples.append(time.perf_counter() - start)
            samples = samples[1:]
        else:
            runner.reset(1)
            runner.step(rng.integers(3, 32000, (1, n)), np.arange(n)[None])
            for s in range(reps + 2):
                start = time.perf_counter()
                runner.step(np.array([[5]]), np.array([[n + s]]))
                samples.append(time.perf_counter() - start)
            samples = samples[2:]
        conn.send(float(np.median(samples)) * 1000)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure(models: dict[str, Path], points: list[tuple[str, int]], rounds: int, reps: int, threads: int,
            capacity: int, window: int, rows: int) -> tuple[dict[str, dict[tuple[str, int], float]], dict[str, float]]:
    """Median over interleaved rounds for every model and point, and each worker's peak RSS (MB)."""
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for name, folder in models.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, str(folder), threads, capacity, window, rows))
        proc.start()
        pipes[name], procs = parent, procs + [proc]
    per_round: dict[str, dict[tuple[str, int], list[float]]] = {n: {p: [] for p in points} for n in models}
    for r in range(rounds):
        for point in points:
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                pipes[name].send((*point, reps))
                per_round[name][point].append(pipes[name].recv())
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    rss = {}
    for name, pipe in pipes.items():
        pipe.send(None)
        rss[name] = pipe.recv()
    for proc in procs:
        proc.join()
    return {n: {p: float(np.median(v)) for p, v in d.items()} for n, d in per_round.items()}, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "fp16", "int8", "int4"])
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per point per round")
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and models (kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ort-bench-"))
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        make_checkpoint(checkpoint, args.window, seed=0)
    capacity = args.window
    rows = capacity + max(8, capacity // 8)  # the buffer our runner allocates by default (cache_slack=-1)
    points = [("prefill", 128), ("prefill", 512), ("decode", 128), ("decode", capacity - 8)]
    results = []
    for precision in args.precisions:
        ours, peer = work / f"ours-{precision}", work / f"peer-{precision}"
        if not (ours / "model.onnx").is_file():
            build_ours(checkpoint, ours, precision)
        if not (peer / "model.onnx").is_file():
            build_peer(checkpoint, peer, precision)
        print(f"measuring {precision}", file=sys.stderr, flush=True)
        times, rss = measure({"ours": ours, "peer": peer}, points, args.rounds, args.reps, args.threads,
                             capacity, args.window, rows)
        wb = {"ours": weight_bytes(ours / "model.onnx"), "peer": weight_bytes(peer / "model.onnx")}
        results.append({"precision": precision, "times": {k: {f"{a}@{b}": v for (a, b), v in t.items()}
                                                          for k, t in times.items()},
                        "rss_mb": rss, "weight_bytes": wb})
    print_table(results, points)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: list[dict[str, Any]], points: list[tuple[str, int]]) -> None:
    head = f"{'precision':9} {'metric':17} {'ours':>9} {'peer':>9} {'ratio':>6}  {'ours GB/s':>9} {'peer GB/s':>9}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        for kind, n in points:
            key = f"{kind}@{n}"
            o, p = r["times"]["ours"][key], r["times"]["peer"][key]
            label = f"prefill T={n} ms" if kind == "prefill" else f"decode@{n} ms/tok"
            bw = ""
            if kind == "decode":
                bw = f"  {r['weight_bytes']['ours'] / o / 1e6:9.1f} {r['weight_bytes']['peer'] / p / 1e6:9.1f}"
            print(f"{r['precision']:9} {label:17} {o:9.2f} {p:9.2f} {o / p:6.2f}{bw}")
        rs = r["rss_mb"]
        print(f"{r['precision']:9} {'peak RSS MB':17} {rs['ours']:9.0f} {rs['peer']:9.0f} {rs['ours'] / rs['peer']:6.2f}")
        wb = r["weight_bytes"]
        print(f"{r['precision']:9} {'weights read MB':17} {wb['ours'] / 1e6:9.1f} {wb['peer'] / 1e6:9.1f}")


if __name__ == "__main__":
    main()
