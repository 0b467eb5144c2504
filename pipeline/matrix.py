"""`mistral-export matrix`: expand a spec into jobs, skip those whose artifact is current, run the
rest on an executor, and write matrix.json, matrix.md and matrix.png beside the artifacts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from exporter.artifact import is_artifact, write_new
from exporter.errors import UserError
from exporter.manifest import dumps, read_manifest
from pipeline.executors import Events, Unit, run_local, run_ray
from pipeline.job_run import artifact_row, base_row
from pipeline.jobs import Job, MatrixSpec, current, expand
from validation import plots

SCHEMA = "mistral-export/matrix"
FILES = ("matrix.json", "matrix.md", "matrix.png")
# Share of the memory available at start that local jobs may declare together.
BUDGET_SHARE = 0.8


@dataclass(frozen=True)
class MatrixRequest:
    spec: MatrixSpec
    out: Path
    executor: str = "local"  # local | ray
    address: str | None = None  # Ray: auto, ray://host:port, or None for a local cluster
    rebuild: bool = False
    memory_budget: int | None = None  # local: bytes [default: BUDGET_SHARE of the available memory]
    workers: int | None = None  # local: jobs at once [default: one per core]
    retries: int = 2  # Ray: retries of a task whose worker died
    schedule_timeout: float = 120.0  # seconds before a job no node can run is reported unschedulable
    use_cache: bool = True


def check_out(out: Path) -> None:
    """The matrix folder holds artifacts and our three files; it must not be an artifact, and a
    matrix.json there that we did not write is never overwritten."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the matrix's artifacts")
    if out.is_dir() and is_artifact(out):
        raise UserError(f"--out {out} is an artifact folder; give the folder that should hold the matrix's artifacts")
    present = [out / name for name in FILES if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return
    previous = out / FILES[0]
    try:
        ours = not previous.is_symlink() and json.loads(previous.read_bytes()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        ours = False
    links = [p for p in present if p.is_symlink()]
    if not ours or links:
        raise UserError(f"{(links or present)[0]} exists and is not a mistral-export matrix's; choose another --out")


def plan(jobs: list[Job], rebuild: bool) -> tuple[list[Unit], list[dict[str, Any]]]:
    """Units to run, and a row for each job already current (skipped)."""
    units: dict[str, Unit] = {}
    skipped: list[dict[str, Any]] = []
    for job in jobs:
        if not rebuild and current(job) is None:
            folder = Path(job.artifact)
            skipped.append({**base_row(job), "status": "skipped", **artifact_row(folder, read_manifest(folder))})
        elif job.kind == "build" or job.after not in units:
            units[job.id] = [job]
        else:
            units[job.after].append(job)
    return list(units.values()), skipped


def run_matrix(req: MatrixRequest, on_event: Events) -> dict[str, Any]:
    started = time.perf_counter()
    check_out(req.out)
    jobs, unsupported = expand(req.spec, req.out, req.use_cache)
    req.out.mkdir(parents=True, exist_ok=True)
    units, skipped = plan(jobs, req.rebuild)
    for row in skipped:
        on_event({"job": row["job"], "done": row})
    if req.executor == "local":
        budget = req.memory_budget or int(psutil.virtual_memory().available * BUDGET_SHARE)
        ran = run_local(units, on_event, budget, req.workers or psutil.cpu_count() or 1)
    elif req.executor == "ray":
        ran = run_ray(units, on_event, req.address, req.retries, req.schedule_timeout)
    else:
        raise UserError(f"--executor must be local or ray, got {req.executor!r}")
    order = {job.id: i for i, job in enumerate(jobs)}
    rows = sorted(ran + skipped, key=lambda r: order[r["job"]]) + unsupported
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "executor": req.executor, "address": req.address, "out": str(req.out), "counts": counts,
               "wall_s": round(time.perf_counter() - started, 2), "jobs": rows}
    write_new(req.out / "matrix.md", render(summary))
    image = plot(rows)
    if image is not None:
        write_new(req.out / "matrix.png", image)
    write_new(req.out / "matrix.json", dumps(summary))  # last: its presence marks the folder as ours
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """1 if a job hit an internal error, 2 if one had bad input or could not be scheduled, 3 if a
    validation gate failed, else 0."""
    rows = summary["jobs"]
    if any(r.get("error_kind") == "internal" for r in rows):
        return 1
    if any(r["status"] in ("failed", "unschedulable") for r in rows):
        return 2
    return 3 if any(r.get("validation") == "failed" for r in rows) else 0


def _kl(row: dict[str, Any]) -> float | None:
    """Quality's corpus mean KL (quantized artifacts), else fidelity's."""
    for section in ("quality", "fidelity"):
        value = (row.get(section) or {}).get("mean_kl")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _cell(value: Any, fmt: str = "{:.3g}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


COLUMNS = ("job", "status", "validation (level)", "fidelity KL", "quality KL", "size MB", "export peak RSS MB",
           "wall s", "TTFT ms (tokens)", "decode ms/token (fill)", "note")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        validation = f"{r['validation']} ({r.get('level') or '-'})" if r.get("validation") else "-"
        out.append([r["job"], r["status"], validation,
                    _cell((r.get("fidelity") or {}).get("mean_kl")), _cell((r.get("quality") or {}).get("mean_kl")),
                    _cell(r.get("size_bytes", 0) / 2**20 if "size_bytes" in r else None, "{:.2f}"),
                    _cell(r.get("peak_rss_mb") if r["status"] in ("built", "checked") else None, "{:.0f}"),
                    _cell(r.get("wall_s"), "{:.1f}"),
                    f"{_cell(r.get('ttft_ms'))} ({r['ttft_tokens']})" if "ttft_ms" in r else "-",
                    f"{_cell(r.get('decode_ms'))} ({r['decode_fill']})" if "decode_ms" in r else "-",
                    (r.get("error") or r.get("reason") or "").replace("|", "/")[:160]])
    return out


def render(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in summary["counts"].items())
    lines = [f"# Build matrix", "", f"{len(summary['jobs'])} jobs ({counts}) on the {summary['executor']} executor "
             f"in {summary['wall_s']} s; {summary['created']}.", "",
             "Peak RSS is the job process's own (VmHWM), for jobs that ran; KL is the corpus mean KL against the "
             "reference (fidelity) and against the float checkpoint (quality).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(summary["jobs"])]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]]) -> bytes | None:
    """Size against decode speed, coloured by KL: one point per artifact."""
    points = [(r["size_bytes"] / 2**20, r["decode_ms"], _kl(r), r["job"]) for r in rows
              if r["kind"] == "build" and "size_bytes" in r and "decode_ms" in r]
    if not points:
        return None
    plt, (fig, ax) = plots.figure(7, cols=1, height=4.5)
    kls = [p[2] if p[2] is not None else 0.0 for p in points]
    dots = ax.scatter([p[0] for p in points], [p[1] for p in points], c=[max(k, 1e-12) for k in kls],
                      cmap="viridis", norm="log", s=60)
    for size, ms, _, label in points:
        ax.annotate(label, (size, ms), fontsize=7, xytext=(4, 4), textcoords="offset points")
    fig.colorbar(dots, ax=ax, label="corpus mean KL (quality, else fidelity)")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("decode ms/token")
    ax.set_title("build matrix: size, decode speed, KL")
    return plots.png(plt, fig)
