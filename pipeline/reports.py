"""`report merge`: validation reports of the same artifacts from several devices as one table, keyed
by artifact id; `report diff`: the regressions and progressions between two runs, per metric.

Reports are read as untrusted JSON: size-capped, parsed strictly, and only the fields used here are
touched; nothing in them names a file that is opened."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from exporter.artifact import write_new
from exporter.errors import UserError
from exporter.manifest import dumps
from validation import plots

REPORT = "mistral-export/validation-report"
MERGED = "mistral-export/merged-reports"
MAX_BYTES = 64 << 20
# Relative change a metric may make before it counts, by metric group.
DEFAULT_THRESHOLDS = {"latency": 0.10, "peak_rss_mb": 0.10, "kl": 1.0, "max_abs": 1.0, "mean_abs": 1.0,
                      "same_top_pct": 0.01, "ppl_ratio": 0.01, "cosine": 1e-4, "top1": 0.0}
# Changes below these are rounding, not a regression (fp32 parity sits at 1e-13 KL).
ABSOLUTE_FLOORS = {"kl": 1e-6, "max_abs": 1e-4, "mean_abs": 1e-5, "cosine": 1e-6}
HIGHER_IS_BETTER = ("cosine", "top1", "same_top_pct")


def _load(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{path} is larger than {MAX_BYTES >> 20} MiB; give a report.json")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give a report.json, an artifact folder or a merged.json") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable JSON report: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") not in (REPORT, MERGED):
        raise UserError(f"{path} is not a mistral-export validation report or merged table")
    return data


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics(rep: dict[str, Any]) -> dict[str, float]:
    """Every parity and latency figure of a report, flat: fidelity.worst.kl, latency.decode_ms[16] ..."""
    out: dict[str, float] = {}
    parity, lat = rep.get("parity") or {}, rep.get("latency") or {}
    for section in ("fidelity", "quality"):
        part = parity.get(section) or {}
        if part.get("status") not in ("passed", "failed"):
            continue
        for key, value in (part.get("worst") or {}).items():
            if _number(value) is not None:
                out[f"{section}.worst.{key}"] = _number(value)
        for key in ("mean_kl", "same_top_pct", "ppl_ratio"):
            if _number((part.get("corpus") or {}).get(key)) is not None:
                out[f"{section}.corpus.{key}"] = _number(part["corpus"][key])
    if lat.get("status") == "measured":
        for row in lat.get("prefill") or []:
            out[f"latency.prefill_ms[{row.get('tokens')}]"] = _number(row.get("median_ms")) or math.nan
        for row in lat.get("decode") or []:
            out[f"latency.decode_ms[{row.get('fill')}]"] = _number(row.get("median_ms")) or math.nan
        if _number(lat.get("peak_rss_mb")) is not None:
            out["latency.peak_rss_mb"] = _number(lat["peak_rss_mb"])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _cell(rep: dict[str, Any], source: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(artifact identity, the cell of this device run) of one report."""
    art, fp = rep.get("artifact"), rep.get("fingerprint")
    if not isinstance(art, dict) or not isinstance(art.get("id"), str) or not isinstance(fp, dict):
        raise UserError(f"{source} has no artifact.id (written by an older version); run `mistral-export "
                        "validate` on the artifact again")
    described = fp.get("device")  # the runner's own words: a string, or a dict with a name (OpenVINO)
    if isinstance(described, dict):
        described = described.get("name")
    machine = described if isinstance(described, str) and described else fp.get("cpu") or "unknown machine"
    identity = {k: art.get(k) for k in ("id", "model", "target", "precision")}
    cell = {"device": f"{art.get('device')} on {machine}", "level": (rep.get("parity") or {}).get("level"),
            "latency_level": (rep.get("latency") or {}).get("level"),
            "parity": (rep.get("parity") or {}).get("status"), "created": rep.get("created"),
            "fingerprint": fp, "source": str(source), "metrics": metrics(rep)}
    return identity, cell


def merge(paths: list[Path]) -> dict[str, Any]:
    """One entry per artifact id, one cell per device; two reports of one artifact on one device are refused."""
    if not paths:
        raise UserError("give at least one report.json to merge")
    artifacts: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = _load(path)
        entries = data["artifacts"] if data["schema"] == MERGED else None
        pairs = ([({k: e.get(k) for k in ("id", "model", "target", "precision")}, c)
                  for e in entries for c in e.get("cells", {}).values()] if entries is not None
                 else [_cell(data, Path(path))])
        for identity, cell in pairs:
            entry = artifacts.setdefault(identity["id"], {**identity, "cells": {}})
            if cell["device"] in entry["cells"]:
                raise UserError(f"two reports of artifact {identity['id'][:12]} on {cell['device']} "
                                f"({entry['cells'][cell['device']]['source']} and {cell['source']}); merge one per "
                                "device, and compare runs with `report diff`")
            entry["cells"][cell["device"]] = cell
    devices = sorted({d for e in artifacts.values() for d in e["cells"]})
    return {"schema": MERGED, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "devices": devices, "artifacts": list(artifacts.values())}


def _label(entry: dict[str, Any]) -> str:
    return f"{entry['model']}-{entry['target']}-{entry['precision']} ({entry['id'][:12]})"


def _headline(cell: dict[str, Any]) -> str:
    m = cell["metrics"]
    decode = next((v for k, v in m.items() if k.startswith("latency.decode_ms")), None)
    kl = m.get("quality.corpus.mean_kl", m.get("fidelity.corpus.mean_kl"))
    parts = [f"{cell['parity']} ({cell['level']})"]
    parts += [f"KL {kl:.3g}"] if kl is not None else []
    parts += [f"decode {decode:.3g} ms"] if decode is not None else []
    return ", ".join(parts)


def render_merged(merged: dict[str, Any]) -> str:
    devices = merged["devices"]
    lines = ["# Cross-device validation", "", "Each cell: parity status (level), corpus mean KL (quality, else "
             "fidelity), decode ms/token at the smallest cache fill.", "",
             "| artifact | " + " | ".join(devices) + " |", "|---|" + "---|" * len(devices)]
    for entry in merged["artifacts"]:
        cells = [_headline(entry["cells"][d]) if d in entry["cells"] else "-" for d in devices]
        lines.append(f"| {_label(entry)} | " + " | ".join(cells) + " |")
    lines += ["", "| device | os | runtime |", "|---|---|---|"]
    seen: dict[str, dict[str, Any]] = {}
    for entry in merged["artifacts"]:
        for d, cell in entry["cells"].items():
            seen.setdefault(d, cell["fingerprint"])
    for d, fp in seen.items():
        runtime = ", ".join(f"{k} {v}" for k, v in (fp.get("runtime") or {}).items() if v)
        lines.append(f"| {d} | {fp.get('os', '')} | {runtime} |")
    return "\n".join(lines) + "\n"


def _csv(merged: dict[str, Any]) -> str:
    names = sorted({k for e in merged["artifacts"] for c in e["cells"].values() for k in c["metrics"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["artifact_id", "model", "target", "precision", "device", "level", "parity", *names])
    for e in merged["artifacts"]:
        for d, c in e["cells"].items():
            writer.writerow([e["id"], e["model"], e["target"], e["precision"], d, c["level"], c["parity"],
                             *[c["metrics"].get(n, "") for n in names]])
    return buffer.getvalue()


def _plot(merged: dict[str, Any]) -> bytes | None:
    """Decode ms/token per artifact, one bar per device."""
    devices = merged["devices"]
    rows = [(e, [next((v for k, v in e["cells"][d]["metrics"].items() if k.startswith("latency.decode_ms")), 0.0)
                 if d in e["cells"] else 0.0 for d in devices]) for e in merged["artifacts"]]
    if not any(any(v for v in values) for _, values in rows):
        return None
    plt, (fig, ax) = plots.figure(max(6.0, 1.5 * len(rows)), cols=1, height=4.0)
    width = 0.8 / max(1, len(devices))
    for i, device in enumerate(devices):
        ax.bar([j + i * width for j in range(len(rows))], [values[i] for _, values in rows], width, label=device)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{e['target']}-{e['precision']}" for e, _ in rows], fontsize=8)
    ax.set_ylabel("decode ms/token (smallest fill)")
    ax.legend(fontsize=7)
    return plots.png(plt, fig)


def write_merged(merged: dict[str, Any], out: Path) -> None:
    """merged.json, merged.md, merged.csv and merged.png into out (created); each replaced whole."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the merged table")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("merged.json", "merged.md", "merged.csv", "merged.png"):
        if (out / name).is_symlink():
            raise UserError(f"{out / name} is a symbolic link; choose another --out")
    write_new(out / "merged.md", render_merged(merged))
    write_new(out / "merged.csv", _csv(merged))
    image = _plot(merged)
    if image is not None:
        write_new(out / "merged.png", image)
    write_new(out / "merged.json", dumps(merged))


# ---- diff ----------------------------------------------------------------------------------------

def _group(metric: str) -> str:
    if metric.startswith("latency.") and "peak_rss" not in metric:
        return "latency"
    for group in ("peak_rss_mb", "same_top_pct", "ppl_ratio", "max_abs", "mean_abs", "cosine", "top1", "kl"):
        if group in metric:
            return group
    return metric


def parse_thresholds(items: list[str]) -> dict[str, float]:
    thresholds = dict(DEFAULT_THRESHOLDS)
    for item in items:
        name, sep, value = item.partition("=")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--threshold takes metric=fraction (e.g. latency=0.05), got {item!r}") from None
        if not sep or not name.strip() or thresholds[name.strip()] < 0:
            raise UserError(f"--threshold takes metric=fraction with a fraction >= 0, got {item!r}")
    return thresholds


def _cells(data: dict[str, Any], source: Path) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
    if data["schema"] == REPORT:
        identity, cell = _cell(data, source)
        return {(identity["id"], cell["device"]): (identity, cell)}
    return {(e["id"], d): (e, c) for e in data["artifacts"] for d, c in e["cells"].items()}


def _compare(metric: str, old: float, new: float, thresholds: dict[str, float]) -> tuple[str, float, float]:
    """('regression' | 'progression' | 'same', relative change, threshold)."""
    group = _group(metric)
    limit = thresholds.get(metric, thresholds.get(group, 0.10))
    delta = new - old
    change = delta / abs(old) if old else (math.inf if delta else 0.0)
    worse = delta < 0 if group in HIGHER_IS_BETTER else delta > 0
    if abs(change) <= limit or abs(delta) <= ABSOLUTE_FLOORS.get(group, 0.0):
        return "same", change, limit
    return ("regression" if worse else "progression"), change, limit


def diff(old_path: Path, new_path: Path, thresholds: dict[str, float]) -> dict[str, Any]:
    old, new = _cells(_load(old_path), old_path), _cells(_load(new_path), new_path)
    if len(old) == 1 and len(new) == 1:
        (old_key, _), (new_key, _) = next(iter(old.items())), next(iter(new.items()))
        if old_key[0] != new_key[0]:
            raise UserError(f"the two reports are of different artifacts ({old_key[0][:12]} and {new_key[0][:12]}); "
                            "diff compares runs of the same artifact")
        new = {old_key: new[new_key]}  # one run against one run: the device label may have changed
    result: dict[str, Any] = {"old": str(old_path), "new": str(new_path), "thresholds": thresholds,
                              "regressions": [], "progressions": [], "unchanged": 0,
                              "only_old": [f"{k[0][:12]} on {k[1]}" for k in old if k not in new],
                              "only_new": [f"{k[0][:12]} on {k[1]}" for k in new if k not in old]}
    for key in (k for k in old if k in new):
        (identity, before), (_, after) = old[key], new[key]
        where = {"artifact": _label(identity), "device": key[1]}
        if before["parity"] == "passed" and after["parity"] == "failed":
            result["regressions"].append({**where, "metric": "parity.status", "old": 1.0, "new": 0.0,
                                          "change": "passed -> failed", "threshold": 0.0})
        for metric in sorted(set(before["metrics"]) & set(after["metrics"])):
            a, b = before["metrics"][metric], after["metrics"][metric]
            verdict, change, limit = _compare(metric, a, b, thresholds)
            if verdict == "same":
                result["unchanged"] += 1
                continue
            result[verdict + "s"].append({**where, "metric": metric, "old": a, "new": b,
                                          "change": f"{change:+.1%}" if math.isfinite(change) else "from 0",
                                          "threshold": limit})
    return result


def render_diff(result: dict[str, Any]) -> str:
    lines = [f"{len(result['regressions'])} regression(s), {len(result['progressions'])} progression(s), "
             f"{result['unchanged']} unchanged ({result['old']} -> {result['new']})"]
    for kind in ("regressions", "progressions"):
        for r in result[kind]:
            lines.append(f"  {kind[:-1]}: {r['metric']} {r['old']:.4g} -> {r['new']:.4g} ({r['change']}, "
                         f"threshold {r['threshold']:.3g}) for {r['artifact']} on {r['device']}")
    for side in ("only_old", "only_new"):
        if result[side]:
            lines.append(f"  {side.replace('_', ' in ')}: {', '.join(result[side])}")
    return "\n".join(lines) + "\n"
