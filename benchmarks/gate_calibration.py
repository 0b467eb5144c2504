"""Derive the gates: measure clean artifacts and the planted defects (benchmarks/defects.py) per
(target, precision) on the tiny model (CALIBRATION_TINY) and on a wider random model, and print the margins.

For the fidelity gate of every quantized row, each planted defect must be separated from clean noise
by at least 3x: a graph defect (window off by one) must exceed the gate 3x on a gated metric, a
weight defect (swapped KV heads, perturbed scale) must fail the exact stored-weight check. Clean
artifacts must sit below every gate. The README's gate table cites this script's output.

    python -m benchmarks.gate_calibration [--models tiny,wide] [--targets onnxruntime,openvino,coreml]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks import defects
from benchmarks.make_checkpoint import write_checkpoint
from exporter.checkpoint import PresetWeights
from exporter.config import MistralConfig, preset
from exporter.errors import UserError
from pipeline.build import BuildRequest, build
from targets import registry
from validation.gates import gates_for
from validation.stage import ValidateRequest, validate_artifact

WIDE = MistralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=16,
                     max_position_embeddings=4096)
QUANTIZED = {"onnxruntime": ("int8", "int4"), "openvino": ("int8", "int4"), "coreml": ("int4",)}
FLOATS = {"reference": ("fp32", "bf16"), "onnxruntime": ("fp32", "fp16"), "openvino": ("fp32", "fp16", "bf16"),
          "coreml": ("fp16",), "tensorrt": ("fp32", "fp16")}
GRAPH_METRICS = ("kl", "max_abs", "mean_abs", "corpus_mean_kl", "corpus_kl_p99")


# The small model the gates were calibrated on, and the suite's numeric tests use: the tiny preset's
# dimensions and seeded weights with a 512-id vocabulary and no tokenizer (ids from the corpus bytes).
# The preset itself carries Mistral's 32000-id tokenizer since; its weights are generated per name and
# shape, so these are exactly the weights the calibration measured.
CALIBRATION_TINY = dataclasses.replace(preset("tiny"), vocab_size=512)


def calibration_checkpoint(folder: Path, cfg: MistralConfig = CALIBRATION_TINY) -> Path:
    """A Hugging Face folder of the tiny preset's seeded weights re-dimensioned to cfg, without a tokenizer."""
    source = PresetWeights("tiny")
    source.config = cfg
    write_checkpoint(cfg, source, "fp32", folder, 1 << 30)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)  # token ids from the corpus bytes
    return folder


def metrics(section: dict[str, Any]) -> dict[str, Any]:
    corpus = section["corpus"]
    return {**{k: section["worst"][k] for k in ("kl", "max_abs", "mean_abs", "cosine")},
            "corpus_mean_kl": corpus["mean_kl"], "corpus_kl_p99": corpus["kl_percentiles"]["p99"],
            "weights": (section.get("weights") or {}).get("status"), "status": section["status"],
            "top1": section["worst"]["top1"], "teacher_forced": section["generation"]["teacher_forced_match"],
            "failed": sorted({f["metric"] for f in section["failures"]})}


def measure(target: str, precision: str, checkpoint: Path | None, work: Path) -> dict[str, Any]:
    extra = {"onnx_only": "true"} if target == "tensorrt" else {}
    plants: dict[str, Callable[[], Any]] = {"clean": nullcontext, "window": defects.window_off_by_one}
    if precision in ("int8", "int4"):
        plants["kv_heads"] = defects.swapped_kv_heads
    out: dict[str, Any] = {}
    for name, plant in [*plants.items(), ("scale", None)]:
        folder = work / f"{target}-{precision}-{name}"
        if name == "scale":
            if precision not in ("int8", "int4"):
                continue
            shutil.copytree(work / f"{target}-{precision}-clean", folder)
            defects.perturbed_scale(folder)
        else:
            with plant():
                build(BuildRequest(target=target, precision=precision, checkpoint=checkpoint, out=folder,
                                   options=extra))
        try:
            parity = validate_artifact(folder, ValidateRequest(latency=False))["parity"]
        except UserError as exc:  # refused before any comparison (the reference target's program check)
            out[name] = {"refused": str(exc)}
            continue
        out[name] = {"fidelity": metrics(parity["fidelity"]), "fidelity_gates": parity["fidelity"]["precision_gates"],
                     "quality": metrics(parity["quality"]) if parity["quality"]["status"] != "same-as-fidelity"
                     else None}
    return out


def _within(values: dict[str, Any], gates: dict[str, float]) -> bool:
    """The gated metrics this script records, judged under today's gates (not the stored status)."""
    return all(values[m] <= gates[m] for m in GRAPH_METRICS if m in gates) and values["cosine"] >= gates["cosine"]


def margins(result: dict[str, Any]) -> dict[str, Any]:
    """gate / clean (headroom) and window / gate (how far the defect is past it), per graph metric."""
    gates = gates_for(result["clean"]["fidelity_gates"])
    clean = result["clean"]["fidelity"]
    if "refused" in result["window"]:
        return {"metrics": {}, "best_window_margin": float("inf"), "weight_defects": {},
                "separated_3x": _within(clean, gates), "window_refused": result["window"]["refused"]}
    window = result["window"]["fidelity"]
    rows = {}
    for m in GRAPH_METRICS:
        gate = gates.get(m)
        if gate in (None, float("inf")):
            continue
        rows[m] = {"clean": clean[m], "window": window[m], "gate": gate,
                   "headroom": gate / max(clean[m], 1e-30), "defect_over_gate": window[m] / gate}
    best = max((r["defect_over_gate"] for r in rows.values()), default=0.0)
    weight_defects = {k: v["fidelity"]["weights"] for k, v in result.items() if k in ("kv_heads", "scale")}
    ok = _within(clean, gates) and best >= 3 and all(s == "failed" for s in weight_defects.values())
    return {"metrics": rows, "best_window_margin": best, "weight_defects": weight_defects, "separated_3x": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,wide")
    parser.add_argument("--targets", default="reference,onnxruntime,openvino,coreml,tensorrt")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--margins-from", type=Path, nargs="*", default=None,
                        help="print the margins of saved measurements (--json files) under today's gates")
    parser.add_argument("--markdown", action="store_true", help="with --margins-from: the README's table")
    args = parser.parse_args()
    if args.margins_from:
        return print_saved(args.margins_from, args.markdown)
    os.environ.setdefault("MISTRAL_EXPORT_CACHE", tempfile.mkdtemp(prefix="calibration-cache-"))
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            checkpoint = calibration_checkpoint(work / f"{model}-ckpt", WIDE if model == "wide" else CALIBRATION_TINY)
            for target in args.targets.split(","):
                reason = registry.get(target).check_available() if target != "tensorrt" else None
                if reason:
                    print(f"{model} {target}: skipped ({reason})")
                    continue
                for precision in (*FLOATS.get(target, ()), *QUANTIZED.get(target, ())):
                    folder = work / model
                    folder.mkdir(exist_ok=True)
                    result = measure(target, precision, checkpoint, folder)
                    result["margins"] = margins(result)
                    report[f"{model}/{target}/{precision}"] = result
                    print_row(model, target, precision, result)
                shutil.rmtree(work / model, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    failed = [k for k, v in report.items() if not v["margins"]["separated_3x"]]
    print(f"\n{len(report) - len(failed)}/{len(report)} rows separate every planted defect by >= 3x"
          + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def print_saved(paths: list[Path], markdown: bool = False) -> int:
    report = {k: v for path in paths for k, v in json.loads(path.read_text()).items()}
    for key, result in report.items():
        result["margins"] = margins(result)
        if not markdown:
            print_row(*key.split("/"), result)
    if markdown:
        print_table(report)
    failed = [k for k, v in report.items() if not v["margins"]["separated_3x"]]
    print(f"\n{len(report) - len(failed)}/{len(report)} rows separate every planted defect by >= 3x"
          + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def print_table(report: dict[str, Any]) -> None:
    """One markdown row per (model, target, precision): clean fidelity against its gate, the window
    defect against the same gate, the exact weight check on the two weight defects, clean quality."""
    print("| model | target | precision | fidelity row | clean kl / gate | window kl | window / gate (best metric) "
          "| clean corpus mean KL | window corpus mean KL | kv heads, scale (exact check) | quality (clean) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in report.items():
        model, target, precision = key.split("/")
        m, clean = r["margins"], r["clean"]["fidelity"]
        kl = m["metrics"].get("kl", {})
        if "refused" in r["window"]:
            window_kl, over, window_corpus = "refused at load", "n/a", "n/a"
        else:
            w = r["window"]["fidelity"]
            window_kl, window_corpus = f"{w['kl']:.2g}", f"{w['corpus_mean_kl']:.2g}"
            best = max(m["metrics"].items(), key=lambda kv: kv[1]["defect_over_gate"])
            over = f"{best[1]['defect_over_gate']:.1f}x ({best[0]})"
        weights = ", ".join(m["weight_defects"].values()) or "not planted (float)"
        quality = r["clean"].get("quality")
        q = (f"{quality['status']}: kl {quality['kl']:.2g}, corpus {quality['corpus_mean_kl']:.2g}"
             if quality else "same as fidelity")
        kl_cell = f"{clean['kl']:.2g} / {kl['gate']:.2g}" if kl else f"{clean['kl']:.2g} / –"
        print(f"| {model} | {target} | {precision} | {r['clean']['fidelity_gates']} | {kl_cell} | {window_kl} | "
              f"{over} | {clean['corpus_mean_kl']:.2g} | {window_corpus} | {weights} | {q} |")


def print_row(model: str, target: str, precision: str, result: dict[str, Any]) -> None:
    m = result["margins"]
    print(f"\n{model} {target} {precision}: fidelity gates {result['clean']['fidelity_gates']}, "
          f"separated >= 3x: {m['separated_3x']}")
    for metric, r in m["metrics"].items():
        print(f"  {metric:15s} clean {r['clean']:.3g}  window {r['window']:.3g}  gate {r['gate']:.3g}  "
              f"gate/clean {r['headroom']:.1f}x  window/gate {r['defect_over_gate']:.1f}x")
    if "window_refused" in m:
        print(f"  window          refused at load: {m['window_refused'][-90:]}")
    for name, status in m["weight_defects"].items():
        graph = result[name]["fidelity"]
        print(f"  {name:15s} stored-weight check {status} (exact); graph kl {graph['kl']:.3g}")
    clean = result["clean"]["fidelity"]
    print(f"  clean           kl {clean['kl']:.3g}, max_abs {clean['max_abs']:.3g}, mean_abs {clean['mean_abs']:.3g}, "
          f"corpus mean KL {clean['corpus_mean_kl']:.3g}, p99 {clean['corpus_kl_p99']:.3g}")
    for name in result:
        quality = result[name].get("quality") if isinstance(result[name], dict) else None
        if quality:
            print(f"  quality {name:9s} {quality['status']}: kl {quality['kl']:.3g}, cosine {quality['cosine']:.3g}, "
                  f"top1 {quality.get('top1', float('nan')):.3g}, teacher-forced "
                  f"{quality.get('teacher_forced', float('nan')):.3g}, corpus mean KL "
                  f"{quality['corpus_mean_kl']:.3g}, p99 {quality['corpus_kl_p99']:.3g}"
                  + (f"; fails {', '.join(quality['failed'])}" if quality.get("failed") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
