"""Core ML target: stateful iOS18 mlprograms with `prefill_<n>` functions at a few chunk lengths and
a `decode` function, in one mlpackage or, for models too large to convert at once, one per block of
layers (targets/coreml/pipeline.py).

Why several functions of one multifunction mlpackage rather than one function with a flexible chunk
length: Core ML specialises each function for static shapes, which the Neural Engine needs (flexible
shapes fall back to CPU/GPU there), and the functions share one weight blob, so the package is no
larger. A chunk shorter than its function is padded with position -1, which the canonical mask already
treats as padding. This could not be measured here (no macOS); it is the documented behaviour.

Attention is the iOS18 `scaled_dot_product_attention` op (GQA heads expanded with tile, as that op
needs equal head counts); the KV cache is fp16 Core ML state (the only state dtype Core ML allows),
updated in place. Off macOS the artifact is validated by executing its MIL with coremltools' value
inference (level `mil-reference`); on macOS through `MLModel.predict` with `make_state()`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.contract import cache_contract, canonical_io
from exporter.errors import UserError
from targets.base import LowerInput, Lowered, check_supported
from targets.coreml.pipeline import DEFAULT_PREFILL, PartsMemory, prefill_lengths

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
STATEFUL_TARGETS = ("iOS18", "macOS15")


@dataclass(frozen=True)
class CoreMLOptions:
    """compute_units: where Core ML may run it; block_size: int4 per-block size; chunks: parts to
    convert (and ship) separately, or auto (the fewest that convert in the available memory);
    prefill_chunks: the prefill functions' chunk lengths, capped at the cache capacity."""

    compute_units: str = "ALL"
    deployment_target: str = "iOS18"
    block_size: int = 32
    chunks: str = "auto"
    prefill_chunks: str = DEFAULT_PREFILL


class CoreMLTarget:
    """coremltools torch.export path to a stateful multifunction mlpackage."""

    name = "coreml"
    devices = ("cpu",)
    precisions = ("fp16", "fp32", "int8", "int4", "palette4")
    options_type = CoreMLOptions
    runtime_packages = ("coremltools", "scikit-learn")
    # Converted part by part, the weights bound in MIL one at a time (targets/coreml/weights.py).
    export_memory = PartsMemory()
    # Conversion and MIL-level validation run anywhere; MLModel.predict needs a Mac.
    device_checks = ("macos",)

    def check_available(self) -> str | None:
        from targets.coreml.lower import quiet_coremltools

        try:
            quiet_coremltools()
        except ImportError:
            return "coremltools is not installed (pip install 'mistral-export[coreml]')"
        return None

    def kernels(self) -> dict[str, str]:
        return {f"cpu/{p}": "iOS18 scaled_dot_product_attention, fp16 MLState KV cache" for p in self.precisions}

    def trace_dtype(self, precision: str) -> str:
        # coremltools casts to fp16 itself (compute_precision); its torch frontend mixes dtypes
        # inside SDPA when handed an fp16 program, so the trace stays fp32.
        return "fp32"

    @staticmethod
    def check_options(options: CoreMLOptions) -> None:
        if options.compute_units not in COMPUTE_UNITS:
            raise UserError(f"unknown compute_units '{options.compute_units}'; valid: {', '.join(COMPUTE_UNITS)}")
        if options.deployment_target not in STATEFUL_TARGETS:
            raise UserError(f"deployment_target '{options.deployment_target}' cannot hold a KV cache as state: "
                            f"Core ML state needs {' or '.join(STATEFUL_TARGETS)} or newer")
        if options.block_size < 1:
            raise UserError(f"block_size must be positive, got {options.block_size}")
        prefill_lengths(options.prefill_chunks, 1 << 30)
        if options.chunks != "auto" and not options.chunks.isdigit():
            raise UserError(f"chunks={options.chunks!r} is neither a number of parts nor auto")

    def lower(self, inp: LowerInput, out_dir: Path) -> Lowered:
        from targets.coreml.compress import compressor
        from targets.coreml.lower import lower_to_mlpackage

        check_supported(self, inp.device, inp.precision)
        self.check_options(inp.options)
        if inp.precision == "int4" and inp.config.hidden_size % inp.options.block_size:
            raise UserError(f"block_size {inp.options.block_size} does not divide hidden_size "
                            f"{inp.config.hidden_size}; pick a divisor such as 32")
        extra = lower_to_mlpackage(inp, out_dir, compressor(inp.precision, inp.options.block_size))
        # fp16 states bound the error whatever the compute precision, so fp32 is gated as fp16.
        gates = "fp16" if inp.precision in ("fp16", "fp32") else inp.precision
        return Lowered(io=canonical_io(inp.config, "fp16")[:2] + [s for s in canonical_io(inp.config, "fp16")
                                                                  if s.role == "logits"],
                       cache=cache_contract(inp.config, inp.capacity, "fp16", residence="stateful"),
                       extra={**extra, "compute_units": inp.options.compute_units, "gates": gates,
                              "deployment_target": inp.options.deployment_target,
                              "kernels": {"cpu": "iOS18 scaled_dot_product_attention"}})

    def readback(self, artifact: Path, manifest: dict[str, Any], source: Any) -> Any:
        """The weights as the MIL program holds them, each checked against the source compressed again."""
        from targets.coreml.readback import readback

        return readback(Path(artifact), manifest, source)

    def fidelity_gates(self, manifest: dict[str, Any], runner: Any) -> str:
        """Compressed weights decompress to fp16, which the program computes in (fp16 state too)."""
        return "fp16"

    def load(self, artifact: Path, manifest: dict[str, Any], device: str | None) -> Any:
        from targets.coreml.pipeline import load as load_pipeline
        from targets.coreml.runner import DeviceRunner, MilRunner

        cfg, cache = manifest["model"]["config"], manifest["cache"]
        shape = (1, cfg["num_key_value_heads"], cache["capacity"], cfg["head_dim"])
        args = (load_pipeline(Path(artifact), manifest), cache["capacity"], cache["window"], shape)
        if platform.system() == "Darwin":
            return DeviceRunner(*args, compute_units=manifest["target"]["compute_units"])
        return MilRunner(*args)
