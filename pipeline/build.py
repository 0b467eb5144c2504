"""Build: weights + config -> one trace -> a target's files -> a whole, self-describing artifact."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter import offline
from exporter.artifact import check_out, staged
from exporter.trace_cache import caching
from exporter.checkpoint import DTYPES, WeightSource
from exporter.sources import open_source
from exporter.config import MistralConfig
from exporter.contract import io_to_dict
from exporter.errors import TargetUnavailable, UserError
from exporter.manifest import tool_versions, write_manifest
from exporter.trace import TracedProgram, TraceSpec, trace_dtype, traced
from targets import registry
from targets.base import LowerInput, Progress, Target, check_supported, parse_options

ARTIFACTS_ROOT = Path("artifacts")
TOKENIZER_DIR = "tokenizer"
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
    job: dict[str, Any] | None = None  # a matrix job's key and spec, recorded in the manifest
    adapter: Path | None = None  # a PEFT LoRA folder, merged into the weights
    adapters: dict[str, Path] = field(default_factory=dict)  # PEFT LoRA folders by name, switchable at run time


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    trace: TracedProgram


def capacity_for(cfg: MistralConfig, max_context: int) -> int:
    """Cache capacity: the sliding window when there is one (a ring buffer), else --max-context,
    which may not exceed the positions the model was trained for."""
    if max_context < 2:
        raise UserError(f"--max-context must be at least 2, got {max_context}")
    if cfg.sliding_window is None and max_context > cfg.max_position_embeddings:
        raise UserError(f"--max-context {max_context} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings}); choose at most that")
    return cfg.sliding_window or max_context


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


def runtime_adapters(target: Target, req: BuildRequest, source: WeightSource) -> dict[str, Any]:
    """The --adapters to build in as switchable inputs, checked before any work starts."""
    if not req.adapters:
        return {}
    precisions = getattr(target, "runtime_adapter_precisions", ())
    if not precisions:
        raise UserError(f"target '{target.name}' has no switchable LoRA adapters; merge one with --adapter DIR "
                        "(onnxruntime and openvino build switchable ones)")
    if req.precision not in precisions:
        raise UserError(f"switchable LoRA adapters are built for {target.name} {', '.join(precisions)} only, not "
                        f"{req.precision}; use --precision {precisions[0]}, or merge one adapter with --adapter DIR")
    if source.adapter is not None:
        raise UserError("give --adapter (merged) or --adapters (switchable), not both")
    from exporter.adapter import open_runtime_adapters

    return open_runtime_adapters(req.adapters, source)


def default_name(source: WeightSource, target: str, precision: str) -> str:
    return f"{source.name}-{target}-{precision}"


def build(req: BuildRequest, progress: Progress | None = None, validator: Validator | None = None,
          source: WeightSource | None = None, traces: dict[str, TracedProgram] | None = None) -> BuildResult:
    """Build one artifact at req.out (or the default path), whole or not at all.

    `source` and `traces` let several builds share one opened checkpoint and one trace per spec.
    With req.use_cache false no cache is read or written at any stage, validation included."""
    offline.disable_telemetry()
    with caching(req.use_cache):
        return _build(req, progress or (lambda message, fraction: None), validator, source, traces)


def _build(req: BuildRequest, progress: Progress, validator: Validator | None, source: WeightSource | None,
           traces: dict[str, TracedProgram] | None) -> BuildResult:
    target, options, req = resolve_target(req)
    source = source or open_source(req.checkpoint, req.preset, req.adapter)
    capacity = capacity_for(source.config, req.max_context)
    out = req.out or ARTIFACTS_ROOT / default_name(source, target.name, req.precision)
    adapter = source.adapter
    runtime = runtime_adapters(target, req, source)
    protect = [p for p in (source.folder, adapter.folder if adapter else None, *req.adapters.values()) if p is not None]
    check_out(out, req.force, protect)  # before any work; staged() checks again under the lock
    progress("tracing", 0.0)
    spec = TraceSpec(source.config, capacity, DTYPES[getattr(target, "trace_dtype", trace_dtype)(req.precision)])
    traces = {} if traces is None else traces
    if spec.key() not in traces:
        traces[spec.key()] = traced(spec, req.use_cache)
    trace = traces[spec.key()]
    with staged(out, req.force, protect) as stage:
        start = time.perf_counter()
        # First, so a target can convert it or place it where its own client looks.
        tokenizer = source.write_tokenizer(stage / TOKENIZER_DIR)
        if tokenizer is not None and tokenizer.get("vocab_size", 0) > source.config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer['vocab_size']} ids but the model only "
                            f"{source.config.vocab_size}; give the checkpoint's own tokenizer file")
        tokenizer_dir = stage / TOKENIZER_DIR if tokenizer is not None else None
        lowered = target.lower(LowerInput(trace, source.config, capacity, req.precision, source,
                                          req.device, options, progress, tokenizer_dir, runtime), stage)
        manifest = {
            "model": {"name": source.name, "source": source.origin().fingerprint(), "config": source.config.to_dict(),
                      "path": str(source.folder.resolve()) if source.folder is not None else None,
                      "format": source.format, "hub_id": source.hub_id,
                      "checkpoint_files": [r.to_dict() for r in source.file_records()],
                      "adapter": adapter.describe() if adapter else None,
                      "tokenizer": TOKENIZER_DIR if tokenizer is not None else None, "tokenizer_info": tokenizer},
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
        if req.job is not None:
            manifest["job"] = req.job
        manifest = write_manifest(stage, manifest)
        if validator is not None:
            manifest["validation"] = validator(stage, manifest, progress)
            manifest = write_manifest(stage, manifest)
    return BuildResult(out, manifest, trace)
