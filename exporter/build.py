"""Build: weights + config -> one trace -> a target's files -> a whole, self-describing artifact."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.artifact import staged
from exporter.checkpoint import DTYPES, TOKENIZER_FILES, CheckpointFolder, WeightSource, open_source
from exporter.config import MistralConfig
from exporter.contract import io_to_dict
from exporter.errors import TargetUnavailable, UserError
from exporter.manifest import tool_versions, write_manifest
from exporter.trace import TracedProgram, TraceSpec, traced
from targets import registry
from targets.base import LowerInput, Progress, Target, check_supported, parse_options

ARTIFACTS_ROOT = Path("artifacts")
# Runs after lowering, inside the staging folder; returns the manifest's validation summary.
Validator = Callable[[Path, dict[str, Any], Progress], dict[str, Any]]


@dataclass(frozen=True)
class BuildRequest:
    """One build, as the CLI or a pipeline asks for it."""

    target: str
    checkpoint: Path | None = None
    preset: str | None = None
    precision: str | None = None  # None: the target's first (default) precision
    device: str | None = None  # None: the target's first (default) device
    max_context: int = 2048
    out: Path | None = None
    force: bool = False
    options: dict[str, str] = field(default_factory=dict)
    use_cache: bool = True


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    trace: TracedProgram


def capacity_for(cfg: MistralConfig, max_context: int) -> int:
    """Cache capacity: the sliding window when there is one (a ring buffer), else --max-context."""
    if max_context < 2:
        raise UserError(f"--max-context must be at least 2, got {max_context}")
    return cfg.sliding_window or max_context


def trace_dtype(precision: str) -> str:
    """Float precisions trace in their own dtype; quantized ones trace fp32 and quantize weights."""
    return precision if precision in DTYPES else "fp32"


def resolve_target(req: BuildRequest) -> tuple[Target, Any, BuildRequest]:
    """The target, its options and the request with target defaults filled in, all checked before
    any work starts."""
    target = registry.get(req.target)
    options = parse_options(target.options_type, req.options)
    # A target may need less for some options (TensorRT's --onnx-only needs no TensorRT).
    availability = getattr(target, "availability_for", None)
    reason = availability(options) if availability else target.check_available()
    if reason:
        raise TargetUnavailable(f"target '{target.name}' is not available here: {reason}")
    req = dataclasses.replace(req, device=req.device or target.devices[0],
                              precision=req.precision or target.precisions[0])
    check_supported(target, req.device, req.precision, getattr(target, "support_table", None))
    return target, options, req


def copy_tokenizer(source: WeightSource, stage: Path) -> bool:
    if source.tokenizer_dir is None:
        return False
    dest = stage / "tokenizer"
    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (source.tokenizer_dir / name).is_file():
            shutil.copy2(source.tokenizer_dir / name, dest / name)
    return True


def default_name(source: WeightSource, target: str, precision: str) -> str:
    return f"{source.name}-{target}-{precision}"


def build(req: BuildRequest, progress: Progress | None = None, validator: Validator | None = None,
          source: WeightSource | None = None, traces: dict[str, TracedProgram] | None = None) -> BuildResult:
    """Build one artifact at req.out (or the default path), whole or not at all.

    `source` and `traces` let several builds share one opened checkpoint and one trace per spec."""
    progress = progress or (lambda message, fraction: None)
    target, options, req = resolve_target(req)
    source = source or open_source(req.checkpoint, req.preset)
    capacity = capacity_for(source.config, req.max_context)
    progress("tracing", 0.0)
    spec = TraceSpec(source.config, capacity, DTYPES[getattr(target, "trace_dtype", trace_dtype)(req.precision)])
    traces = {} if traces is None else traces
    if spec.key() not in traces:
        traces[spec.key()] = traced(spec, req.use_cache)
    trace = traces[spec.key()]
    out = req.out or ARTIFACTS_ROOT / default_name(source, target.name, req.precision)
    with staged(out, req.force) as stage:
        start = time.perf_counter()
        lowered = target.lower(LowerInput(trace.program, source.config, capacity, req.precision, source,
                                          req.device, options, progress), stage)
        has_tokenizer = copy_tokenizer(source, stage)
        manifest = {
            "model": {"name": source.name, "source": source.fingerprint(), "config": source.config.to_dict(),
                      "path": str(source.folder.resolve()) if isinstance(source, CheckpointFolder) else None,
                      "checkpoint_files": [r.to_dict() for r in source.file_records()],
                      "tokenizer": "tokenizer" if has_tokenizer else None},
            "tool": tool_versions(getattr(target, "runtime_packages", ())),
            "target": {"name": target.name, "device": req.device, "precision": req.precision,
                       "options": dataclasses.asdict(options), **lowered.extra},
            "io": io_to_dict(lowered.io),
            "cache": lowered.cache.to_dict(),
            "trace": {"key": trace.spec.key(), "dtype": str(trace.spec.dtype).removeprefix("torch."),
                      "seconds": round(trace.seconds, 3), "cache_hit": trace.cache_hit},
            "lower_seconds": round(time.perf_counter() - start, 3),
            "validation": {"status": "not-run"},
        }
        manifest = write_manifest(stage, manifest)
        if validator is not None:
            manifest["validation"] = validator(stage, manifest, progress)
            manifest = write_manifest(stage, manifest)
    return BuildResult(out, manifest, trace)
