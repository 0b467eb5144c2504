"""A build matrix: its spec (MATRIX.toml or flags), and its expansion into jobs.

Every job has a content-addressed key (the checkpoint's file hashes, target, precision, device,
options, validation settings and tool versions) that names its artifact folder, so a rerun finds
what is already built. A job is one build plus its validation; a check that needs a device no build
node has (Core ML predict on a Mac) is a second job on the same artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.manifest import read_manifest, tool_versions
from exporter.sources import open_source
from targets import registry
from targets.base import check_supported, parse_options
from targets.resources import device_checks, export_memory, job_resource, validation_memory

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SPEC_KEYS = {"checkpoints", "presets", "targets", "precisions", "devices", "max_context", "validate", "latency",
              "options"}


@dataclass(frozen=True)
class MatrixSpec:
    """Checkpoints x targets x precisions x devices. Empty precisions/devices: each target's default."""

    targets: tuple[str, ...]
    checkpoints: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    options: dict[str, dict[str, str]] = field(default_factory=dict)  # per target: key=value
    max_context: int = 2048
    validate: bool = True
    latency: bool = True


@dataclass(frozen=True)
class Job:
    """One unit of work, as plain data so it crosses process and node boundaries."""

    id: str
    kind: str  # "build" (build + validation) or "check" (validation on a device, after its build)
    target: str
    precision: str
    device: str
    model: str
    checkpoint: str | None
    preset: str | None
    options: dict[str, str]
    max_context: int
    validate: bool
    latency: bool
    key: str
    artifact: str
    memory_bytes: int
    resource: str | None  # a node resource the job needs (macos, GPU, intel_npu...), or None
    after: str | None = None  # the build a check follows
    use_cache: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Job:
        return Job(**data)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"matrix: '{name}' must be a list of strings (or a comma-separated string), got {value!r}")
    return tuple(value)


def spec_from_dict(raw: dict[str, Any], where: str) -> MatrixSpec:
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(_SPEC_KEYS))}")
    options = raw.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise UserError(f"{where}: 'options' must be a table per target, e.g. [options.onnxruntime] block_size = 64")
    max_context = raw.get("max_context", 2048)
    if isinstance(max_context, bool) or not isinstance(max_context, int):
        raise UserError(f"{where}: 'max_context' must be an integer, got {max_context!r}")
    flags = {}
    for name in ("validate", "latency"):
        flags[name] = raw.get(name, True)
        if not isinstance(flags[name], bool):
            raise UserError(f"{where}: '{name}' must be true or false, got {flags[name]!r}")
    spec = MatrixSpec(targets=_strings(raw.get("targets", []), "targets"),
                      checkpoints=_strings(raw.get("checkpoints", []), "checkpoints"),
                      presets=_strings(raw.get("presets", []), "presets"),
                      precisions=_strings(raw.get("precisions", []), "precisions"),
                      devices=_strings(raw.get("devices", []), "devices"),
                      options={t: {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in o.items()}
                               for t, o in options.items()},
                      max_context=max_context, **flags)
    if not spec.targets:
        raise UserError(f"{where}: no targets; give targets = [\"onnxruntime\", ...] or --target a,b")
    return spec


def load_spec(path: Path) -> MatrixSpec:
    """MATRIX.toml: the keys of MatrixSpec at the top level, options as [options.<target>] tables."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"matrix file {path} does not exist; give the path of a MATRIX.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read matrix file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"matrix file {path} is not valid TOML: {exc}") from None
    return spec_from_dict(raw, str(path))


def job_key(fingerprint: str, target: Any, precision: str, device: str, options: dict[str, str],
            spec: MatrixSpec) -> str:
    """sha256 over everything that decides the artifact's bytes and its validation."""
    identity = {"source": fingerprint, "target": target.name, "precision": precision, "device": device,
                "options": dict(sorted(options.items())), "max_context": spec.max_context,
                "validate": spec.validate, "latency": spec.latency,
                "tool": tool_versions(getattr(target, "runtime_packages", ()))}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def expand(spec: MatrixSpec, out: Path, use_cache: bool = True) -> tuple[list[Job], list[dict[str, Any]]]:
    """The jobs, and a row for each combination a target does not support (never run)."""
    sources = [("checkpoint", c) for c in spec.checkpoints] + [("preset", p) for p in spec.presets]
    if not sources:
        sources = [("preset", "tiny")]
    targets = [registry.get(name) for name in spec.targets]  # unknown names fail before any work
    for name in spec.options:
        if name not in spec.targets:
            raise UserError(f"matrix: options for '{name}', which is not among the targets {list(spec.targets)}")
    jobs: list[Job] = []
    unsupported: list[dict[str, Any]] = []
    for kind, value in sources:
        source = open_source(Path(value) if kind == "checkpoint" else None, value if kind == "preset" else None)
        fingerprint = source.fingerprint()
        for target in targets:
            raw = spec.options.get(target.name, {})
            options = parse_options(target.options_type, raw)
            for precision in spec.precisions or target.precisions[:1]:
                for device in spec.devices or target.devices[:1]:
                    ident = f"{source.name}-{target.name}-{precision}-{device}"
                    try:
                        check_supported(target, device, precision, getattr(target, "support_table", None))
                    except UserError as exc:
                        unsupported.append({"job": ident, "kind": "build", "target": target.name,
                                            "precision": precision, "device": device, "status": "unsupported",
                                            "error": str(exc)})
                        continue
                    key = job_key(fingerprint, target, precision, device, raw, spec)
                    memory = max(export_memory(target, source.config, precision),
                                 validation_memory(source.config, precision) if spec.validate else 0)
                    build = Job(id=ident, kind="build", target=target.name, precision=precision, device=device,
                                model=source.name, checkpoint=value if kind == "checkpoint" else None,
                                preset=value if kind == "preset" else None, options=raw,
                                max_context=spec.max_context, validate=spec.validate, latency=spec.latency,
                                key=key, artifact=str(out / f"{ident}-{key[:12]}"), memory_bytes=memory,
                                resource=job_resource(target, device, options), use_cache=use_cache)
                    jobs.append(build)
                    if spec.validate:
                        jobs += [dataclasses.replace(build, id=f"{ident}@{res}", kind="check", resource=res,
                                                     after=build.id,
                                                     memory_bytes=validation_memory(source.config, precision))
                                 for res in device_checks(target)]
    return jobs, unsupported


def current(job: Job) -> str | None:
    """None when the job's artifact is already there, intact and of this key; else why it must run."""
    folder = Path(job.artifact)
    if not folder.exists():
        return "not built"
    try:
        manifest = read_manifest(folder)
    except UserError as exc:
        return f"rebuilding: {exc}"
    if (manifest.get("job") or {}).get("key") != job.key:
        return "rebuilding: the artifact's job key differs"
    if job.kind == "check" and manifest.get("validation", {}).get("level") != "device":
        return "not validated on the device yet"
    return None
