"""The validation stage: parity gates and latency for one artifact, written into it as reports."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from exporter.artifact import locked, rewrite
from exporter.errors import NotMeasurable
from exporter.config import MistralConfig
from exporter.limits import check_caches_fit
from exporter.manifest import artifact_id, listed_dir, read_manifest, write_manifest
from exporter.trace_cache import caching
from targets import registry
from validation import latency, report
from validation.fidelity import check_parity
from validation.tokenizers import check_tokenizers

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ValidateRequest:
    """What to check and how."""

    device: str | None = None
    precision_gates: str | None = None
    parity: bool = True
    latency: bool = True
    reference_checkpoint: Path | None = None
    reference_adapter: Path | None = None
    reference_dtype: str = "auto"
    new_tokens: int = 20
    use_cache: bool = True  # the runtimes' compiled-model caches (OpenVINO); the reference never uses one
    latency_settings: latency.LatencySettings | None = None  # bench's points, repeats, batch
    adapters: tuple[str, ...] | None = None  # switchable adapters to validate besides the base (None: all)


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The manifest's short form of a report."""
    p, lat = rep["parity"], rep["latency"]
    out: dict[str, Any] = {"status": p["status"], "level": p["level"], "report": "report.json",
                           "measured_at": rep["created"]}
    if p["status"] != "not-run":
        out.update(failures=len(p["failures"]),
                   first_failures=[f"{f['section']}: {f['metric']} at {f['step']}" for f in p["failures"][:3]])
        if p.get("padding"):
            out["padding"] = p["padding"]
        if p.get("adapters"):
            out["adapters"] = {name: part["status"] for name, part in p["adapters"].items()}
        for section in ("fidelity", "quality"):
            part = p.get(section) or {}
            if part.get("status") in ("passed", "failed"):
                out[section] = {"status": part["status"], "gates": part["precision_gates"], "worst": part["worst"],
                                "corpus_mean_kl": part["corpus"]["mean_kl"] if part.get("corpus") else None}
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
    cfg = MistralConfig(**manifest["model"]["config"])
    check_caches_fit(cfg, manifest["cache"]["capacity"], 2, 3, "validation")
    threads = req.latency_settings.threads if req.latency_settings else None
    manifest, runner = registry.load_runner(artifact, req.device, threads=threads)
    level = getattr(runner, "level", "device")
    device = req.device or manifest["target"]["device"]
    parity: dict[str, Any] = {"status": "not-run", "level": level}
    if req.parity:
        tokenizer = None
        if manifest["model"].get("tokenizer"):
            from validation.text import load_tokenizer
            tokenizer = load_tokenizer(listed_dir(artifact, manifest, manifest["model"]["tokenizer"]))
        parity = check_parity(artifact, manifest, runner, tokenizer, req, progress)
        parity["measured_on"] = _where(runner, device, manifest)
        progress("validation: tokenizer parity", 0.95)
        parity["tokenizer"] = check_tokenizers(artifact, manifest, tokenizer)
        parity["failures"] += [{"section": "tokenizer", **f} for f in parity["tokenizer"].get("failures", [])]
        parity["adapters"] = _adapters(artifact, manifest, runner, tokenizer, req, progress)
        parity["failures"] += [{**f, "section": f"adapter {name}: {f['section']}"}
                               for name, part in parity["adapters"].items() for f in part["failures"]]
        parity["status"] = "failed" if parity["failures"] else parity["status"]
        padding = getattr(runner, "padding", None)  # runners that pad chunks to fixed lengths (Core ML)
        if callable(padding):
            parity["padding"] = padding()
    lat: dict[str, Any] = {"status": "not-run", "level": level}
    if req.latency:
        lat = {"status": "measured", "level": level, **latency.measure(runner, cfg.vocab_size, req.latency_settings, progress)}
    rep = {"schema": "mistral-export/validation-report", "schema_version": report.REPORT_SCHEMA_VERSION,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "artifact": {"id": artifact_id(manifest, report.FILES), "target": manifest["target"]["name"], "precision": manifest["target"]["precision"],
                        "device": device, "model": manifest["model"]["name"],
                        "shape": report.model_shape(cfg)},
           "fingerprint": latency.fingerprint(runner, manifest["tool"]),
           "parity": parity, "latency": lat}
    return manifest, rep


def _adapters(artifact: Path, manifest: dict[str, Any], runner: Any, tokenizer: Any, req: ValidateRequest,
              progress: Progress) -> dict[str, Any]:
    """Parity of each switchable adapter: the same runner with it active (no second integrity check of
    the artifact), against the reference with it merged. The runner is left on the base model."""
    names = list(manifest["target"].get("adapters") or {}) if req.adapters is None else list(req.adapters)
    files = {name: registry.adapter_file(artifact, manifest, name) for name in names}  # unknown: exit 2
    results = {}
    try:
        for i, name in enumerate(names):
            progress(f"validation: adapter {name}", 0.9 + 0.05 * i / len(names))
            runner.set_adapter(files[name])
            part = check_parity(artifact, manifest, runner, tokenizer, req, lambda m, f: None, adapter=name)
            results[name] = {k: part[k] for k in ("status", "fidelity", "quality", "failures")}
    finally:
        if names:
            runner.set_adapter(None)
    return results


def build_validator(latency: bool = True) -> Callable[[Path, dict[str, Any], Progress], dict[str, Any]]:
    """The build's last step: validate the staged artifact on its build device. An artifact that
    cannot run here is recorded as not validated, with the reason, and the build still succeeds."""

    def run(stage: Path, manifest: dict[str, Any], progress: Progress) -> dict[str, Any]:
        try:
            return summary(validate_artifact(stage, ValidateRequest(latency=latency), progress, in_place=True))
        except NotMeasurable as exc:
            return {"status": "not-run", "reason": str(exc)}

    return run
