"""int4 speed/quality table: our int4 configurations against each peer's default int4, one checkpoint,
one run, both sides measured alike.

Checkpoint: the ~155M random Mistral of benchmarks/onnxruntime_vs_genai.py. Quality: every model reads
the same token rows (the validation corpus mapped byte by byte onto ids, ROWS rows of ROW_LEN tokens,
prefilled in chunks of CHUNK) and its logits are compared at every position with the eager fp32
canonical model on the checkpoint's weights (validation/reference.py): mean KL(float || int4), its 99th
percentile and the share of positions with the same top token (validation/corpus.py's statistics).
Speed: ONNX Runtime models run in benchmarks/onnxruntime_vs_genai.py's harness (each in its own worker,
same session options, IO binding and cache buffer for ours and the builder's, interleaved run by run);
OpenVINO models in benchmarks/openvino_vs_optimum.py's (ours through its Runner, optimum-intel's IR
through a bare infer request, interleaved round by round). Size: the bytes of the model's files.

Random weights have no outliers, which makes them kind to large blocks: on a real checkpoint a block
of 128 loses more than this table shows, so keep `--option block_size=32` (ONNX Runtime) or
`--option group_size=32` (OpenVINO) as the conservative choice there.

    python -m benchmarks.int4_table --optimum-cli <venv>/bin/optimum-cli --json int4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import onnxruntime_vs_genai as ortb
from benchmarks import openvino_vs_optimum as ovb

ROWS, ROW_LEN, CHUNK = 4, 512, 128
# name: our --option list (ONNX Runtime; accuracy_level 4 is our default and the builder's on CPU).
ORT_OURS = {
    "b32 sym": ("block_size=32",),
    "b32 asym": ("block_size=32", "symmetric=false"),
    "b64 sym": ("block_size=64",),
    "b64 asym": ("block_size=64", "symmetric=false"),
    "b128 sym": ("block_size=128",),
    "b128 asym": ("block_size=128", "symmetric=false"),
    "b32 sym, lm_head float": ("block_size=32", "quantize_lm_head=false"),
    "b128 sym, lm_head float": ("block_size=128", "quantize_lm_head=false"),
    "b32 sym, lm_head int8": ("block_size=32", "lm_head_bits=8"),
    "b64 sym, lm_head int8": ("block_size=64", "lm_head_bits=8"),
    "b128 sym, lm_head int8": ("block_size=128", "lm_head_bits=8"),
    "b128 asym, lm_head int8": ("block_size=128", "symmetric=false", "lm_head_bits=8"),
}
# The builder's own int4 (--extra_options): its default (RTN, block 32), block 128, and ORT's k_quant.
ORT_PEERS = {"builder default": (), "builder b128": ("block_size=128",), "builder k_quant": ("int4_algo_config=k_quant",)}
# ORT's HQQ quantizer (MatMulNBitsQuantizer, HQQWeightOnlyQuantConfig: data-free, asymmetric with float
# zero points) run on the builder's fp32 graph: block size per row.
ORT_HQQ = {"ORT HQQ b64": 64, "ORT HQQ b128": 128}
OV_OURS = {
    "g128 sym": ("group_size=128",),
    "g64 sym": ("group_size=64",),
    "g32 sym": ("group_size=32",),
    "g128 asym": ("group_size=128", "mode=asym"),
    "g128 asym, lm_head int8": ("group_size=128", "mode=asym", "all_layers=false"),  # the peer's own config
    "g128 sym, lm_head int8": ("group_size=128", "all_layers=false"),
    "g32 sym, lm_head int8": ("group_size=32", "all_layers=false"),
}
OV_PEERS = {"optimum default": []}  # --weight-format int4 alone: int4_asym g128, embedding/lm_head int8_asym
ALWAYS = ("builder default", "optimum default", "b32 sym", "g128 sym")


def build_hqq(checkpoint: Path, out: Path, block_size: int, work: Path) -> None:
    """ORT's HQQ quantizer over the builder's fp32 model, written beside it (the folder renamed into place)."""
    if (out / "model.onnx").is_file():
        return
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    fp32 = work / "ort-builder-fp32"
    if not (fp32 / "model.onnx").is_file():
        ortb.build_peer(checkpoint, fp32, "fp32", None)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")),
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=4))
    quantizer.process()
    staging = Path(tempfile.mkdtemp(prefix=".hqq-", dir=work))
    onnx.save_model(quantizer.model.model, str(staging / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data")
    staging.rename(out)


def build_optimum(cli: str, checkpoint: Path, out: Path, extra: list[str]) -> None:
    if (out / "openvino_model.xml").is_file():
        return
    ovb.run([cli, "export", "openvino", "--model", str(checkpoint), "--task", "text-generation-with-past",
             "--weight-format", "int4", *extra, str(out)])


def optimum_checkpoint(checkpoint: Path, work: Path) -> Path:
    """The checkpoint with a config.json without layer_types (optimum-intel 2.2 refuses it; the rows
    here are shorter than the window, so the window does not enter the comparison). Made beside its
    place and renamed into it whole, so a killed run leaves no half copy to be taken for a whole one."""
    copy = work / "checkpoint-optimum"
    if copy.is_dir():
        return copy
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-optimum-", dir=work))
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (staging / f.name).symlink_to(f.resolve())
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg.pop("layer_types", None)
    (staging / "config.json").write_text(json.dumps(cfg))
    try:
        staging.rename(copy)
    except OSError:  # a concurrent run put its own copy there first: use that one
        if not copy.is_dir():
            raise
    return copy


def size_mb(folder: Path) -> float:
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix in (".onnx", ".data", ".bin", ".xml")]
    return sum(f.stat().st_size for f in files) / 1e6


def corpus_rows(vocab: int) -> list[list[int]]:
    """The first ROWS rows of ROW_LEN tokens of the validation corpus (validation/corpus.py)."""
    from validation import corpus

    ids, _ = corpus.tokens(None, vocab)
    return corpus.rows(ids, ROW_LEN, None, held=ROW_LEN)[:ROWS]


def logits_of(runner: Any, rows: list[list[int]]) -> list[np.ndarray]:
    """[T, V] logits of every row, batch 1, prefilled CHUNK tokens at a time."""
    out = []
    for row in rows:
        runner.reset(1)
        ids = np.array([row], dtype=np.int64)
        parts = [np.array(runner.step(ids[:, a:a + CHUNK], np.arange(a, min(a + CHUNK, len(row)))[None]))[0]
                 for a in range(0, len(row), CHUNK)]
        out.append(np.concatenate(parts).astype(np.float32))
    return out


def quality(reference: list[np.ndarray], got: list[np.ndarray], rows: list[list[int]]) -> dict[str, float]:
    from validation.corpus import Positions, summarize

    pos = Positions()
    for ref, art, row in zip(reference, got, rows):
        pos.add(ref[:-1], art[:-1], np.array(row[1:]))
    s = summarize(pos)
    return {"mean_kl": s["mean_kl"], "kl_p99": s["kl_percentiles"]["p99"], "same_top_pct": s["same_top_pct"]}


_REFERENCE: dict[tuple[str, int], list[np.ndarray]] = {}


def reference_logits(artifact: Path, rows: list[list[int]]) -> list[np.ndarray]:
    """The eager fp32 model's logits on the rows, computed once per checkpoint and capacity (every
    runtime's rows compare against the same ones)."""
    from exporter.manifest import read_manifest
    from validation.reference import reference_runner, source_from_manifest

    manifest = read_manifest(artifact)
    key = (manifest["model"]["source"], manifest["cache"]["capacity"])
    if key not in _REFERENCE:
        _REFERENCE[key] = logits_of(reference_runner(manifest, source_from_manifest(manifest)), rows)
    return _REFERENCE[key]


def ort_runner(folder: Path, threads: int, capacity: int) -> Any:
    return ortb.open_runner(str(folder), threads, capacity, capacity, ortb.buffer_rows(capacity))


def matmul_nbits(folder: Path) -> str:
    """Block size and symmetry of a graph's MatMulNBits, read from the graph itself."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    blocks = sorted({a.i for n in nodes for a in n.attribute if a.name == "block_size"})
    levels = sorted({a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"})
    asym = sum(len(n.input) > 3 and bool(n.input[3]) for n in nodes)
    return f"{len(nodes)} MatMulNBits, block {blocks}, accuracy_level {levels}, {asym} with zero points"


def wanted(name: str, args: argparse.Namespace) -> bool:
    """Whether --rows asks for this row; each peer's default (every ratio needs it) and our own default
    (the baseline of the choice) are always measured."""
    return not args.rows or name in args.rows or name in ALWAYS


def onnxruntime_rows(checkpoint: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    capacity = args.window
    models: dict[str, Path] = {}
    for name, options in [(n, o) for n, o in ORT_OURS.items() if wanted(n, args)]:
        models[name] = work / ("ort-" + name.replace(" ", "").replace(",", "-"))
        ovb.export_ours(checkpoint, models[name], "int4", options, target="onnxruntime")
    for name, extra in ORT_PEERS.items():
        models[name] = work / ("ort-" + name.replace(" ", ""))
        if not (models[name] / "model.onnx").is_file():
            ortb.build_peer(checkpoint, models[name], "int4", None, extra)
    for name, block in ORT_HQQ.items():
        models[name] = work / ("ort-" + name.replace(" ", ""))
        build_hqq(checkpoint, models[name], block, work)
    models = {name: folder for name, folder in models.items() if wanted(name, args)}
    rows = corpus_rows(ortb.HF_CONFIG["vocab_size"])
    ours = next(folder for name, folder in models.items() if name in ORT_OURS)
    reference = reference_logits(ours, rows)
    result = {name: {"runtime": "onnxruntime", "row": name, "size_mb": size_mb(folder), "graph": matmul_nbits(folder),
                     **quality(reference, logits_of(ort_runner(folder, args.threads, capacity), rows), rows)}
              for name, folder in models.items()}
    # Timed in pairs, each model against the peer's default in the same interleaved run: with many
    # workers in one run, their order and the machine's load skewed single figures by up to 40%.
    points = [("prefill", 128), ("prefill", 512), ("decode", 128)]
    peer = "builder default"
    for name in [n for n in models if n != peer]:
        for group, samples in (("prefill", args.prefill_samples), ("decode", args.decode_samples)):
            times, _ = ortb.measure({name: models[name], peer: models[peer]}, [p for p in points if p[0] == group],
                                    samples, args.threads, capacity, capacity, ortb.buffer_rows(capacity))
            for (k, n), v in times[name].items():
                result[name][f"{k}@{n}"] = v
                result[name][f"{k}@{n}_vs_peer"] = v / times[peer][(k, n)]
                result[peer].setdefault(f"{k}@{n}_runs", []).append(times[peer][(k, n)])
    for key in [k for k in result[peer] if k.endswith("_runs")]:
        result[peer][key.removesuffix("_runs")] = statistics.median(result[peer].pop(key))
        result[peer][key.removesuffix("_runs") + "_vs_peer"] = 1.0
    return list(result.values())


def openvino_rows(checkpoint: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    ours = {name: work / ("ov-" + name.replace(" ", "").replace(",", "-")) for name in OV_OURS if wanted(name, args)}
    for name, folder in ours.items():
        ovb.export_ours(checkpoint, folder, "int4", (*OV_OURS[name], f"threads={args.threads}"))
    peers = {name: work / ("ov-" + name.replace(" ", "")) for name in OV_PEERS}
    if args.optimum_cli:
        for name, folder in peers.items():
            build_optimum(args.optimum_cli, optimum_checkpoint(checkpoint, work), folder, OV_PEERS[name])
    else:
        print("openvino: no --optimum-cli, so no peer rows", file=sys.stderr)
        peers = {}
    runners = {name: ovb.open_ours(folder, args.threads)[0] for name, folder in ours.items()}
    runners.update({name: ovb.open_peer(folder / "openvino_model.xml", {}, args.threads)[0] for name, folder in peers.items()})
    folders = {**ours, **peers}
    rows = corpus_rows(ortb.HF_CONFIG["vocab_size"])
    reference = reference_logits(next(iter(ours.values())), rows)
    result = {name: {"runtime": "openvino", "row": name, "size_mb": size_mb(folders[name]),
                     **quality(reference, logits_of(runner, rows), rows)} for name, runner in runners.items()}
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(3, 32000, (1, n)).astype(np.int64) for n in (128, 512)}
    steps = args.decode_samples // args.rounds + 1
    peer = next(iter(peers), None)

    def timed(name: str) -> dict[str, list[float]]:
        return {**{f"prefill@{n}": [ovb.time_prefill(runners[name], ids, 3)] for n, ids in prompts.items()},
                "decode@128": ovb.time_decode(runners[name], prompts[128], steps)}

    peer_runs: dict[str, list[float]] = {}
    for name in [n for n in runners if n != peer]:  # in pairs with the peer, as for ONNX Runtime
        runs: dict[str, dict[str, list[float]]] = {name: {}, peer: {}} if peer else {name: {}}
        for i in range(args.rounds):  # interleaved, alternating order, so load hits both alike
            for who in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                for k, v in timed(who).items():
                    runs[who].setdefault(k, []).extend(v)
        for k, v in runs[name].items():
            result[name][k] = statistics.median(v)
            if peer:
                result[name][k + "_vs_peer"] = result[name][k] / statistics.median(runs[peer][k])
                peer_runs.setdefault(k, []).append(statistics.median(runs[peer][k]))
    if peer:
        result[peer].update({k: statistics.median(v) for k, v in peer_runs.items()})
        result[peer].update({k + "_vs_peer": 1.0 for k in peer_runs})
    return list(result.values())


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows; "vs peer" is the ratio to the peer's default timed in the same pair."""
    head = ("| row | decode@128 ms/token | vs peer | prefill 128 ms | vs peer | prefill 512 ms | vs peer | size MB "
            "| mean KL | KL p99 | same top % |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['row']} | {r['decode@128']:.2f} | {r.get('decode@128_vs_peer', float('nan')):.2f}x "
             f"| {r['prefill@128']:.1f} | {r.get('prefill@128_vs_peer', float('nan')):.2f}x "
             f"| {r['prefill@512']:.1f} | {r.get('prefill@512_vs_peer', float('nan')):.2f}x "
             f"| {r['size_mb']:.0f} | {r['mean_kl']:.4f} | {r['kl_p99']:.4f} | {r['same_top_pct']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"], choices=["onnxruntime", "openvino"])
    ap.add_argument("--optimum-cli", default=None, help="optimum-cli of the venv holding optimum-intel (OpenVINO peer)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-samples", type=int, default=5, help="ONNX Runtime: timed prefills per point and model")
    ap.add_argument("--decode-samples", type=int, default=40, help="timed decode steps per model")
    ap.add_argument("--rounds", type=int, default=6, help="OpenVINO: interleaved rounds")
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and models (kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows (and each peer's default)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="int4-table-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint"
    ortb.ensure_checkpoint(checkpoint, args.window)
    results = []
    if "onnxruntime" in args.runtimes:
        results += onnxruntime_rows(checkpoint, work, args)
        print(table([r for r in results if r["runtime"] == "onnxruntime"]), flush=True)
    if "openvino" in args.runtimes:
        results += openvino_rows(checkpoint, work, args)
        print(table([r for r in results if r["runtime"] == "openvino"]), flush=True)
    for r in results:
        if "graph" in r:
            print(f"  {r['row']}: {r['graph']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
