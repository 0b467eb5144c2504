"""The validation report: report.json (versioned schema), report.md and latency.png."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from exporter.artifact import write_new
from exporter.manifest import dumps

REPORT_SCHEMA_VERSION = 1
FILES = ("report.json", "report.md", "latency.png", "parity.png")  # what a validation run (re)writes
LEVELS = ("device", "mil-reference", "onnx-proxy")
_NUM = {"type": ["number", "null"]}
_STATS = {"type": "object", "required": ["median_ms", "p90_ms", "runs"],
          "properties": {"median_ms": {"type": "number"}, "p90_ms": {"type": "number"},
                         "runs": {"type": "integer"}}}

# JSON Schema of report.json; pipelines may validate against it (validation/README.md explains it).
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "schema_version", "artifact", "fingerprint", "parity", "latency"],
    "properties": {
        "schema": {"const": "mistral-export/validation-report"},
        "schema_version": {"const": REPORT_SCHEMA_VERSION},
        "artifact": {"type": "object", "required": ["target", "precision", "device", "model"]},
        "fingerprint": {"type": "object", "required": ["cpu", "os", "runtime"]},
        "parity": {
            "type": "object", "required": ["status", "level"],
            "properties": {
                "status": {"enum": ["passed", "failed", "not-run"]},
                "level": {"enum": list(LEVELS)},
                "measured_on": {"type": "string"},
                "precision_gates": {"type": "string"},
                "gates": {"type": "object", "additionalProperties": _NUM},
                "case": {"type": "object"},
                "worst": {"type": "object", "additionalProperties": _NUM},
                "generation": {"type": "object"},
                "steps": {"type": "array", "items": {
                    "type": "object", "required": ["step", "max_abs", "mean_abs", "cosine", "top1", "kl"]}},
                "failures": {"type": "array", "items": {
                    "type": "object", "required": ["metric", "step", "value", "threshold", "bound"]}},
            },
        },
        "latency": {
            "type": "object", "required": ["status", "level"],
            "properties": {
                "status": {"enum": ["measured", "not-run"]},
                "level": {"enum": list(LEVELS)},
                "prefill": {"type": "array", "items": {**_STATS, "required": ["tokens", *_STATS["required"]]}},
                "decode": {"type": "array", "items": {**_STATS, "required": ["fill", "tokens_per_s",
                                                                             *_STATS["required"]]}},
                "peak_rss_mb": _NUM,
                "device_memory_mb": _NUM,
            },
        },
    },
}


def write_json(folder: Path, report: dict[str, Any]) -> None:
    write_new(folder / "report.json", dumps(report))


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any]) -> str:
    a, p, lat, fp = report["artifact"], report["parity"], report["latency"], report["fingerprint"]
    lines = [f"# Validation report: {a['model']} -> {a['target']} ({a['precision']}, {a['device']})", "",
             f"Measured on: {fp['cpu']} ({fp['logical_cores']} logical cores), {fp['os']}; "
             f"threads {fp.get('threads')}; runtime {fp['runtime']}", ""]
    if fp.get("device"):
        lines += [f"Device: {fp['device']}", ""]
    lines += [f"## Parity: **{p['status']}** (level `{p['level']}`, gates `{p.get('precision_gates')}`)", ""]
    if p["status"] != "not-run":
        case = p["case"]
        lines += [f"Reference: canonical fp32 program. Inputs: {case['source']}, prompt lengths "
                  f"{case['prompt_lengths']}, chunk {case['chunk']}, {case['new_tokens']} decode steps.", "",
                  "| metric | worst (top1: pooled over positions) | gate |", "|---|---|---|"]
        for k, v in p["worst"].items():
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(p['gates'][k])} |")
        g = p["generation"]
        lines += [f"| teacher_forced_match | {_fmt(g['teacher_forced_match'])} | "
                  f"{_fmt(p['gates']['teacher_forced_match'])} |",
                  f"| free_running_match | {_fmt(g['free_running_match'])} | "
                  f"{_fmt(p['gates']['free_running_match'])} |", ""]
        if p["failures"]:
            lines += [f"{len(p['failures'])} gate failure(s):", ""]
            lines += [f"- {f['metric']} at {f['step']} = {_fmt(f['value'])} "
                      f"({'<=' if f['bound'] == 'max' else '>='} {_fmt(f['threshold'])})" for f in p["failures"][:50]]
            lines.append("")
        lines += ["| step | positions | max_abs | mean_abs | cosine | top1 | kl |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['positions']} | {_fmt(s['max_abs'])} | {_fmt(s['mean_abs'])} | "
                  f"{_fmt(s['cosine'])} | {_fmt(s['top1'])} | {_fmt(s['kl'])} |" for s in p["steps"]]
        lines.append("")
    lines += [f"## Latency: {lat['status']} (level `{lat['level']}`)", ""]
    if lat["status"] == "measured":
        lines += ["| prefill tokens | median ms | p90 ms |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |" for r in lat["prefill"]]
        lines += ["", "| decode at cache fill | median ms/token | p90 ms | tokens/s |", "|---|---|---|---|"]
        lines += [f"| {r['fill']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['tokens_per_s']:.1f} |"
                  for r in lat["decode"]]
        lines += ["", f"Peak host RSS (process): {lat['peak_rss_mb']} MB; device memory: "
                      f"{lat['device_memory_mb'] if lat['device_memory_mb'] is not None else 'n/a'}", "",
                  "![latency](latency.png)", ""]
    return "\n".join(lines)


def plot(folder: Path, report: dict[str, Any]) -> bool:
    """latency.png: prefill ms per chunk length and decode ms per cache fill."""
    lat = report["latency"]
    if lat["status"] != "measured":
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, rows, x, title in ((left, lat["prefill"], "tokens", "prefill (TTFT)"),
                               (right, lat["decode"], "fill", "decode per token")):
        xs = [r[x] for r in rows]
        ax.plot(xs, [r["median_ms"] for r in rows], "o-", label="median")
        ax.plot(xs, [r["p90_ms"] for r in rows], "x--", label="p90")
        ax.set_xlabel("chunk tokens" if x == "tokens" else "cache fill")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    a = report["artifact"]
    fig.suptitle(f"{a['target']} {a['precision']} on {report['fingerprint']['cpu'][:50]} ({lat['level']})",
                 fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_new(folder / "latency.png", buffer.getvalue())
    plt.close(fig)
    return True


def write_all(folder: Path, report: dict[str, Any]) -> None:
    """The report files, each written as a new file (the folder may hold hard links to another's)."""
    write_json(folder, report)
    write_new(folder / "report.md", markdown(report))
    plot(folder, report)
