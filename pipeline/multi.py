"""Many targets from one trace: open the checkpoint once, trace once per distinct spec, build each
target into its own artifact, and report every target's outcome in build-summary.json."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from typing import Any

from exporter.artifact import write_new
from exporter.manifest import dumps
from pipeline.build import ARTIFACTS_ROOT, BuildRequest, Validator, build, default_name
from exporter.sources import open_source
from exporter.errors import UserError
from exporter.trace import TracedProgram
from targets import registry
from targets.base import Progress

ALL_AVAILABLE = "all-available"
SUMMARY = "build-summary.json"


def expand_targets(spec: str) -> list[str]:
    """'a,b,c' or 'all-available' -> target names (unknown names fail before any work)."""
    if spec == ALL_AVAILABLE:
        return [n for n in registry.names() if registry.get(n).check_available() is None]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        registry.get(name)
    if len(set(names)) != len(names):
        raise UserError(f"--target lists a target twice: {spec}")
    return names


def build_many(req: BuildRequest, names: list[str], progress_for: Callable[[str], Progress],
               validator: Validator | None) -> dict[str, Any]:
    """Build each target; a failing target is recorded and the others go on. `req.out` is the parent
    folder of the artifacts (default artifacts/)."""
    parent = req.out or ARTIFACTS_ROOT
    source = open_source(req.checkpoint, req.preset, req.adapter)
    traces: dict[str, TracedProgram] = {}
    started = time.perf_counter()
    results = []
    for name in names:
        one = dataclasses.replace(req, target=name, out=None)
        t0 = time.perf_counter()
        try:
            target = registry.get(name)
            precision = one.precision or target.precisions[0]
            one = dataclasses.replace(one, out=parent / default_name(source, name, precision))
            result = build(one, progress_for(name), validator, source=source, traces=traces)
            validation = result.manifest["validation"]
            results.append({"target": name, "status": "built", "artifact": str(result.out),
                            "validation": validation.get("status"), "trace_cache_hit": result.trace.cache_hit,
                            "seconds": round(time.perf_counter() - t0, 2)})
        except UserError as exc:
            results.append({"target": name, "status": "failed", "error": str(exc), "kind": "input",
                            "seconds": round(time.perf_counter() - t0, 2)})
        except Exception as exc:  # noqa: BLE001 - one target's bug must not stop the others; it is reported
            results.append({"target": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                            "kind": "internal", "traceback": traceback.format_exc(),
                            "seconds": round(time.perf_counter() - t0, 2)})
    summary = {"model": source.name, "source": source.fingerprint(), "targets": results,
               "traces": len(traces), "total_seconds": round(time.perf_counter() - started, 2)}
    parent.mkdir(parents=True, exist_ok=True)
    write_new(parent / SUMMARY, dumps(summary))
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """1 if a target hit an internal error, 2 if one had bad input, 3 if a gate failed, else 0."""
    kinds = {r.get("kind") for r in summary["targets"] if r["status"] == "failed"}
    if "internal" in kinds:
        return 1
    if "input" in kinds:
        return 2
    return 3 if any(r.get("validation") == "failed" for r in summary["targets"]) else 0
