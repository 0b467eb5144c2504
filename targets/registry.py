"""Target registry: an explicit table, plus third-party targets from the entry-point group
``mistral_export.targets``. Modules are imported on lookup only, so a missing runtime never
breaks the others."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from exporter.errors import TargetUnavailable, UserError
from exporter.manifest import read_manifest
from targets.base import Runner, Target

ENTRY_POINT_GROUP = "mistral_export.targets"

BUILTIN: dict[str, str] = {
    "reference": "targets.reference:ReferenceTarget",
    "coreml": "targets.coreml:CoreMLTarget",
    "tensorrt": "targets.tensorrt:TensorRTTarget",
    "onnxruntime": "targets.onnxruntime.target:OnnxRuntimeTarget",
    "openvino": "targets.openvino:OpenVinoTarget",
}


def _specs() -> dict[str, str]:
    specs = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        specs.setdefault(ep.name, ep.value)
    return specs


def names() -> list[str]:
    return list(_specs())


def get(name: str) -> Target:
    specs = _specs()
    if name not in specs:
        raise UserError(f"unknown target '{name}'; valid targets: {', '.join(specs)}")
    module, _, attr = specs[name].partition(":")
    return getattr(importlib.import_module(module), attr)()


def load_runner(artifact: Path, device: str | None = None, adapter: str | None = None,
                threads: int | None = None) -> tuple[dict[str, Any], Runner]:
    """Verify an artifact's files against its manifest and open a runner on it, with one of its
    switchable LoRA adapters active if `adapter` names one, on `threads` intra-op threads if given."""
    manifest = read_manifest(artifact)
    target = get(manifest["target"]["name"])
    # Targets with option-dependent needs (TensorRT: engine or ONNX proxy) decide in load().
    reason = None if hasattr(target, "availability_for") else target.check_available()
    if reason:
        raise TargetUnavailable(f"artifact {artifact} needs target '{target.name}', not available here: {reason}")
    opened = manifest
    if threads is not None:
        option = getattr(target, "thread_option", None)
        if option is None:
            raise UserError(f"target '{target.name}' has no thread setting; run without --threads")
        # The runner is opened as if built with that option; the returned manifest stays as verified.
        opened = {**manifest, "target": {**manifest["target"],
                                         "options": {**manifest["target"]["options"], option: threads}}}
    runner = target.load(Path(artifact), opened, device)
    if adapter is not None:
        runner.set_adapter(adapter_file(artifact, manifest, adapter))  # type: ignore[attr-defined]
    return manifest, runner


def adapter_file(artifact: Path, manifest: dict[str, Any], name: str) -> Path:
    """The file of a switchable adapter the manifest lists (inside the artifact, hash-checked)."""
    from exporter.manifest import listed_file

    adapters = manifest["target"].get("adapters") or {}
    if name not in adapters:
        known = ", ".join(sorted(adapters)) or "none: build with --adapters name=DIR to have some"
        raise UserError(f"artifact {artifact} has no adapter {name!r}; its adapters: {known}")
    return listed_file(Path(artifact), manifest, adapters[name]["file"])
