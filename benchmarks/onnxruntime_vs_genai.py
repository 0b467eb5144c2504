"""Our ONNX Runtime artifact against onnxruntime-genai's model builder, same checkpoint, same ORT.

A seeded random Mistral (~150M: hidden 1024, 8 layers, 16/4 heads, vocab 32000, sliding window) is
written as a Hugging Face folder with a tokenizer and ``layer_types`` (without them the builder
drops the window). Both artifacts are driven by the same harness: an InferenceSession with the same
threads, IO binding and a shared, window-sized past/present buffer of the same rows
(targets/onnxruntime/runner.py; the builder's graph has the same IO names minus position_ids).
Each model lives in its own worker process (so peak RSS is per model). The models alternate run
by run (every prefill, every decode step), so load from other processes hits both alike; each
figure is the median of those runs. Effective bandwidth is weight bytes read per decode step
(all initializers but the gathered embedding) over the step's time.

    flock /tmp/heavy.lock python -m benchmarks.onnxruntime_vs_genai --precisions fp32 fp16 int8 int4 int4/b128
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


# The builder's fp16 CPU graph is not a GQA graph (MultiHeadAttention, repeat_kv and concatenated
# caches, no window buffer), so it cannot share this harness; our fp16 is compared with its fp32.
PEER_PRECISION = {"fp16": "fp32"}


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


def ensure_checkpoint(folder: Path, window: int, seed: int = 0) -> None:
    """make_checkpoint unless a complete one is there: tokenizer_config.json is written last, after
    save_pretrained's config.json and weights, so a killed run's folder is written again."""
    if not (folder / "tokenizer_config.json").is_file():
        make_checkpoint(folder, window, seed)


def buffer_rows(capacity: int) -> int:
    """The cache buffer rows our runner allocates by default (cache_slack=-1), given to both sides."""
    return capacity + max(8, capacity // 8)


def build_ours(checkpoint: Path, out: Path, precision: str, block_size: int | None) -> None:
    from pipeline.build import BuildRequest, build

    options = {} if block_size is None else {"block_size": str(block_size)}
    build(BuildRequest(target="onnxruntime", checkpoint=checkpoint, precision=precision, out=out, options=options))


def build_peer(checkpoint: Path, out: Path, precision: str, block_size: int | None,
               extra: tuple[str, ...] = ()) -> None:
    """The builder's model; `extra`: more of its --extra_options (key=value)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out / "cache")]
    options = ([f"block_size={block_size}"] if block_size is not None else []) + list(extra)
    if options:
        cmd += ["--extra_options", *options]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def weight_bytes(model_file: Path) -> int:
    """Bytes of every initializer a decode step reads: all but the ones feeding a Gather (the
    embedding, of which a step reads one row). An fp16 initializer cast to fp32 (our cpu/fp16) is
    read as fp32: ORT folds the cast at session start."""
    import onnx

    m = onnx.load(str(model_file), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    widened = {n.input[0] for n in m.graph.node
               if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT}
    total = 0
    for t in m.graph.initializer:
        if t.name in gathered:
            continue
        ext = {e.key: e.value for e in t.external_data}
        size = int(ext["length"]) if "length" in ext else len(t.raw_data)
        total += 2 * size if t.name in widened and t.data_type == onnx.TensorProto.FLOAT16 else size
    return total


def open_runner(model_dir: str, threads: int, capacity: int, window: int, rows: int) -> Any:
    """The shared harness on one model folder, ours or the builder's: GqaRunner on a session with the
    same threads and a cache buffer of the same rows, its cache layout read from the graph."""
    from targets.onnxruntime.runner import GqaRunner, session

    import onnx

    m = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    past = next(i for i in m.graph.input if i.name == "past_key_values.0.key")
    dims = past.type.tensor_type.shape.dim
    elem = {1: "fp32", 10: "fp16"}[past.type.tensor_type.elem_type]
    cache = {"num_layers": HF_CONFIG["num_hidden_layers"], "kv_heads": dims[1].dim_value,
             "head_dim": dims[3].dim_value or HF_CONFIG["hidden_size"] // HF_CONFIG["num_attention_heads"],
             "dtype": elem}
    return GqaRunner(session(Path(model_dir) / "model.onnx", "cpu", threads), "cpu", capacity, window,
                     cache, threads, rows, None)


def _worker(conn: Any, model_dir: str, threads: int, capacity: int, window: int, rows: int) -> None:
    runner = open_runner(model_dir, threads, capacity, window, rows)
    rng = np.random.default_rng(0)
    while (msg := conn.recv()) is not None:
        try:
            conn.send(_request(runner, rng, *msg))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
            conn.send(f"{type(exc).__name__}: {exc}")
    conn.send(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM: unlike ru_maxrss it does not carry the spawning parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _request(runner: Any, rng: np.random.Generator, kind: str, n: int) -> float:
    """prefill: ms of a fresh prefill of n tokens; fill: prefill n tokens (untimed); decode: ms of
    one decode step at position n."""
    if kind == "decode":
        start = time.perf_counter()
        runner.step(np.array([[5]]), np.array([[n]]))
        return (time.perf_counter() - start) * 1000
    runner.reset(1)
    start = time.perf_counter()
    runner.step(rng.integers(3, 32000, (1, n)), np.arange(n)[None])
    return (time.perf_counter() - start) * 1000


def measure(models: dict[str, Path], points: list[tuple[str, int]], samples: int, threads: int,
            capacity: int, window: int, rows: int) -> tuple[dict[str, dict[tuple[str, int], float]], dict[str, float]]:
    """Median ms per model and point, the models interleaved run by run (each prefill, each decode
    step), so a load change on the machine hits both alike; and each worker's peak RSS (MB)."""
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for name, folder in models.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, str(folder), threads, capacity, window, rows))
        proc.start()
        pipes[name], procs = parent, procs + [proc]

    def ask(name: str, *msg: object) -> float:
        pipes[name].send(msg)
        reply = pipes[name].recv()
        if isinstance(reply, str):
            for proc in procs:
                proc.kill()
            raise RuntimeError(f"{name} failed at {msg}: {reply}")
        return reply

    times: dict[str, dict[tuple[str, int], float]] = {n: {} for n in models}
    warmup = 2
    for kind, n in points:
        runs: dict[str, list[float]] = {name: [] for name in models}
        if kind == "decode":
            for name in models:
                ask(name, "fill", n)
        for i in range(warmup + samples):
            for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
                ms = ask(name, "prefill" if kind == "prefill" else "decode", n if kind == "prefill" else n + i)
                if i >= warmup:
                    runs[name].append(ms)
        for name in models:
            times[name][(kind, n)] = float(np.median(runs[name]))
        print(f"  {kind} {n}: " + ", ".join(f"{k} {v[(kind, n)]:.2f} ms" for k, v in times.items()),
              file=sys.stderr, flush=True)
    rss = {}
    for name, pipe in pipes.items():
        pipe.send(None)
        rss[name] = pipe.recv()
    for proc in procs:
        proc.join()
    return times, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"],
                    help="fp32, fp16, int8, int4; int4/b128 (or int8/b64...) sets both sides' quantization block")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-samples", type=int, default=9, help="timed prefills per point and model")
    ap.add_argument("--decode-samples", type=int, default=40, help="timed decode steps per point and model")
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and models (kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ort-bench-"))
    checkpoint = work / "checkpoint"
    ensure_checkpoint(checkpoint, args.window)
    capacity = args.window
    rows = buffer_rows(capacity)
    points = [("prefill", 128), ("prefill", 512), ("decode", 128), ("decode", capacity - 16)]
    results = []
    for spec in args.precisions:
        precision, _, block = spec.partition("/b")  # int4/b128: both sides with quantization block 128
        block_size = int(block) if block else None
        peer_precision = PEER_PRECISION.get(precision, precision)
        suffix = f"-b{block}" if block else ""
        ours, peer = work / f"ours-{precision}{suffix}", work / f"peer-{peer_precision}{suffix}"
        if not (ours / "model.onnx").is_file():
            build_ours(checkpoint, ours, precision, block_size)
        if not (peer / "model.onnx").is_file():
            build_peer(checkpoint, peer, peer_precision, block_size)
        print(f"measuring {spec}", file=sys.stderr, flush=True)
        times, rss = {}, {}
        for group, samples in (("prefill", args.prefill_samples), ("decode", args.decode_samples)):
            t, r = measure({"ours": ours, "peer": peer}, [p for p in points if p[0] == group], samples,
                           args.threads, capacity, args.window, rows)
            times = {k: {**times.get(k, {}), **v} for k, v in t.items()}
            rss = {k: max(rss.get(k, 0.0), v) for k, v in r.items()}
        wb = {"ours": weight_bytes(ours / "model.onnx"), "peer": weight_bytes(peer / "model.onnx")}
        results.append({"precision": spec, "peer_precision": peer_precision + (f"/b{block}" if block else ""),
                        "times": {k: {f"{a}@{b}": v for (a, b), v in t.items()} for k, t in times.items()},
                        "rss_mb": rss, "weight_bytes": wb})
        print_table(results[-1:], points)
    print_table(results, points)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: list[dict[str, Any]], points: list[tuple[str, int]]) -> None:
    head = f"{'precision':9} {'metric':17} {'ours':>9} {'peer':>9} {'ratio':>6}  {'ours GB/s':>9} {'peer GB/s':>9}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        if r["peer_precision"] != r["precision"]:
            print(f"{r['precision']:9} (peer built at {r['peer_precision']})")
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
