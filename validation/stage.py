"""The validation stage: parity gates and latency for one artifact, written into it as reports."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from exporter.artifact import locked, rewrite
from exporter.errors import NotMeasurable
from exporter.config import MistralConfig
from exporter.limits import check_caches_fit
from exporter.manifest import listed_dir, read_manifest, write_manifest
from exporter.trace_cache import caching
from targets import registry
from validation import latency, report
from validation.gates import gates_for, loosest
from validation.parity import ParityResult, compare, default_case
from validation.reference import reference_dtype, reference_runner, source_from_manifest

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ValidateRequest:
    """What to check and how."""

    device: str | None = None
    precision_gates: str | None = None
    parity: bool = True
    latency: bool = True
    reference_checkpoint: Path | None = None
    reference_dtype: str = "auto"
    new_tokens: int = 20
    use_cache: bool = True  # the runtimes' compiled-model caches (OpenVINO); the reference never uses one


def _parity_section(result: ParityResult | None, level: str, measured_on: str, gates_name: str,
                    ref_dtype: torch.dtype) -> dict[str, Any]:
    if result is None:
        return {"status": "not-run", "level": level}
    return {"status": "passed" if result.passed else "failed", "level": level, "measured_on": measured_on,
            "precision_gates": gates_name, "gates": result.gates, "case": result.case.describe(),
            "reference": "eager canonical model, " + str(ref_dtype).removeprefix("torch.") + ", no trace or cache",
            "worst": result.worst(), "generation": result.generation,
            "steps": [s.to_dict() for s in result.steps], "failures": [f.to_dict() for f in result.failures]}


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The manifest's short form of a report."""
    p, lat = rep["parity"], rep["latency"]
    out: dict[str, Any] = {"status": p["status"], "level": p["level"], "report": "report.json",
                           "measured_at": rep["created"]}
    if p["status"] != "not-run":
        out.update(precision_gates=p["precision_gates"], worst=p["worst"], failures=len(p["failures"]),
                   first_failures=[f"{f['metric']} at {f['step']}" for f in p["failures"][:3]],
                   free_running_match=p["generation"]["free_running_match"])
    if lat["status"] == "measured":
        out["latency"] = {"prefill_ms": {r["tokens"]: round(r["median_ms"], 3) for r in lat["prefill"]},
                          "decode_ms": {r["fill"]: round(r["median_ms"], 3) for r in lat["decode"]}}
    return out


def _where(runner: Any, device: str, manifest: dict[str, Any]) -> str:
    describe = getattr(runner, "describe_device", None)
    return describe() if callable(describe) else f"{device} ({manifest['target']['name']})"


def validate_artifact(artifact: Path, req: ValidateRequest, progress: Progress | None = None,
                      in_place: bool = False) -> dict[str, Any]:
    """Run parity and latency and write report.json/.md/.png and the manifest's summary into the
    artifact. A published artifact is locked meanwhile and updated atomically (its old reports stay
    until the new ones are complete); in_place is for a build's own staging folder."""
    artifact = Path(artifact)
    with nullcontext() if in_place else locked(artifact), caching(req.use_cache):
        manifest, rep = _measure(artifact, req, progress or (lambda m, f: None))
        manifest["validation"] = summary(rep)
        if in_place:
            report.write_all(artifact, rep)
            write_manifest(artifact, manifest)
        else:
            rewrite(artifact, manifest, lambda stage: report.write_all(stage, rep), report.FILES)
    return rep


def _measure(artifact: Path, req: ValidateRequest, progress: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest (verified) and the report of one validation run; nothing is written."""
    manifest = read_manifest(artifact)
    cfg_obj = MistralConfig(**manifest["model"]["config"])
    check_caches_fit(cfg_obj, manifest["cache"]["capacity"], 2, 2, "validation")
    manifest, runner = registry.load_runner(artifact, req.device)
    level = getattr(runner, "level", "device")
    device = req.device or manifest["target"]["device"]
    # A target may name a gate row other than its precision (Core ML fp32 keeps fp16 state).
    gates_name = req.precision_gates or manifest["target"].get("gates") or manifest["target"]["precision"]
    gates = gates_for(gates_name)
    cfg = manifest["model"]["config"]
    result = None
    ref_dtype = reference_dtype(manifest, req.reference_dtype)
    if ref_dtype != torch.float32:
        gates_name = f"{gates_name}+bf16-reference"
        gates = loosest(gates, gates_for("bf16"))
    if req.parity:
        source = source_from_manifest(manifest, req.reference_checkpoint)
        tokenizer = None
        if manifest["model"].get("tokenizer"):
            from validation.text import load_tokenizer
            tokenizer = load_tokenizer(listed_dir(artifact, manifest, manifest["model"]["tokenizer"]))
        case = default_case(runner.capacity, runner.window, cfg["vocab_size"], tokenizer, req.new_tokens)
        result = compare(reference_runner(manifest, source, ref_dtype), runner, case, gates, progress)
    lat: dict[str, Any] = {"status": "not-run", "level": level}
    if req.latency:
        lat = {"status": "measured", "level": level, **latency.measure(runner, cfg["vocab_size"], progress=progress)}
    rep = {"schema": "mistral-export/validation-report", "schema_version": report.REPORT_SCHEMA_VERSION,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "artifact": {"target": manifest["target"]["name"], "precision": manifest["target"]["precision"],
                        "device": device, "model": manifest["model"]["name"]},
           "fingerprint": latency.fingerprint(runner, manifest["tool"]),
           "parity": _parity_section(result, level, _where(runner, device, manifest), gates_name, ref_dtype),
           "latency": lat}
    return manifest, rep


def build_validator() -> Callable[[Path, dict[str, Any], Progress], dict[str, Any]]:
    """The build's last step: validate the staged artifact on its build device. An artifact that
    cannot run here is recorded as not validated, with the reason, and the build still succeeds."""

    def run(stage: Path, manifest: dict[str, Any], progress: Progress) -> dict[str, Any]:
        try:
            return summary(validate_artifact(stage, ValidateRequest(), progress, in_place=True))
        except NotMeasurable as exc:
            return {"status": "not-run", "reason": str(exc)}

    return run
