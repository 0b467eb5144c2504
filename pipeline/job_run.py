"""Run one matrix job in this process and describe its outcome as a matrix row.

The local executor runs each job as `python -m pipeline.job_run` (one process per job, so a crash or
an out-of-memory kill costs only that job, and the peak RSS is the job's own); a Ray worker calls
run_job directly, in a worker that serves one task only."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter import offline
from exporter.errors import UserError
from exporter.manifest import read_manifest
from pipeline.build import BuildRequest, build
from pipeline.jobs import Job

Emit = Callable[[dict[str, Any]], None]


def own_peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM (ru_maxrss of a forked child would count its parent's pages)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def artifact_row(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Size, validation outcome and headline latency from a verified manifest."""
    v = manifest.get("validation", {})
    row: dict[str, Any] = {"size_bytes": sum(f["bytes"] for f in manifest["files"]),
                           "validation": v.get("status"), "level": v.get("level"), "reason": v.get("reason")}
    for section in ("fidelity", "quality"):
        part = v.get(section)
        if part:
            row[section] = {"status": part["status"], "mean_kl": part.get("corpus_mean_kl"),
                            "worst_kl": part.get("worst", {}).get("kl")}
    lat = v.get("latency") or {}
    if lat.get("prefill_ms"):
        tokens, ms = next(iter(lat["prefill_ms"].items()))
        row["ttft_ms"], row["ttft_tokens"] = ms, int(tokens)
    if lat.get("decode_ms"):
        fill, ms = next(iter(lat["decode_ms"].items()))
        row["decode_ms"], row["decode_fill"] = ms, int(fill)
    return row


def base_row(job: Job) -> dict[str, Any]:
    return {"job": job.id, "kind": job.kind, "target": job.target, "precision": job.precision,
            "device": job.device, "model": job.model, "key": job.key, "artifact": job.artifact,
            "resource": job.resource}


def run_job(job: Job, emit: Emit | None = None) -> dict[str, Any]:
    """Build (and validate) or check one job; every outcome, bugs included, is a row."""
    offline.disable_telemetry()
    emit = emit or (lambda event: None)
    row = base_row(job)
    started = time.perf_counter()

    def progress(message: str, fraction: float) -> None:
        emit({"job": job.id, "message": message, "fraction": fraction})

    try:
        if job.kind == "build":
            from validation.stage import build_validator

            req = BuildRequest(target=job.target, checkpoint=Path(job.checkpoint) if job.checkpoint else None,
                               preset=job.preset, precision=job.precision, device=job.device,
                               max_context=job.max_context, out=Path(job.artifact), force=True,
                               options=dict(job.options), use_cache=job.use_cache,
                               job={"id": job.id, "key": job.key})
            result = build(req, progress, build_validator(latency=job.latency) if job.validate else None)
            row.update(status="built", **artifact_row(result.out, result.manifest))
        else:
            from validation.stage import ValidateRequest, validate_artifact

            validate_artifact(Path(job.artifact), ValidateRequest(latency=job.latency, use_cache=job.use_cache),
                              progress)
            row.update(status="checked", **artifact_row(Path(job.artifact), read_manifest(Path(job.artifact))))
    except UserError as exc:
        row.update(status="failed", error=str(exc), error_kind="input")
    except Exception as exc:  # noqa: BLE001 - one job's bug must not stop the matrix; it is reported
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", error_kind="internal",
                   traceback=traceback.format_exc())
    row["wall_s"] = round(time.perf_counter() - started, 2)
    row["peak_rss_mb"] = own_peak_rss_mb()
    row["host"], row["pid"] = os.uname().nodename, os.getpid()
    return row


def main() -> int:
    """`python -m pipeline.job_run JOB_JSON EVENTS_FD`: run the job, report progress and the row as
    JSON lines on EVENTS_FD (stdout is left to the libraries)."""
    from exporter import signals

    signals.install()
    job = Job.from_dict(json.loads(sys.argv[1]))
    with os.fdopen(int(sys.argv[2]), "w", buffering=1) as events:
        def emit(event: dict[str, Any]) -> None:
            events.write(json.dumps(event) + "\n")

        row = run_job(job, emit)
        emit({"job": job.id, "row": row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
