"""What a build of one target needs from the machine that runs it: memory, from the export-memory
model each target declares (fitted to the measured 7B rows of docs/benchmarks.md), and the device
resource a cluster node must offer (Ray custom resources: macos, GPU, intel_gpu, intel_npu)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.config import MistralConfig

GIB = 1 << 30
# Imports, the trace and the converter's own state: 0.4-0.9 GiB measured on every target.
BASELINE_BYTES = GIB
# Stored bytes per weight: int8/int4 carry one fp16 scale per block of 32 (and int8 zero points).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.06, "int4": 0.56, "palette4": 0.56}


def parameter_count(cfg: MistralConfig) -> int:
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_hidden_layers * (attn + mlp + 2 * cfg.hidden_size) + embeddings + cfg.hidden_size


def largest_tensor_bytes(cfg: MistralConfig) -> int:
    """The largest weight in fp32, the unit a streaming converter holds in flight."""
    return 4 * max(cfg.vocab_size * cfg.hidden_size, cfg.intermediate_size * cfg.hidden_size,
                   cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size)


@dataclass(frozen=True)
class ExportMemory:
    """Peak RSS of an export: baseline + fp32_factor x the fp32 weights (a converter that binds the
    whole model) + output_factor x the output weights (one that keeps its output in memory) +
    tensors_in_flight x the largest fp32 tensor (a streaming converter)."""

    fp32_factor: float = 0.0
    output_factor: float = 0.0
    tensors_in_flight: int = 2

    def bytes(self, cfg: MistralConfig, precision: str) -> int:
        params = parameter_count(cfg)
        return int(BASELINE_BYTES + self.fp32_factor * 4 * params
                   + self.output_factor * WEIGHT_BYTES.get(precision, 4.0) * params
                   + self.tensors_in_flight * largest_tensor_bytes(cfg))


# A target that declares nothing is assumed to bind the fp32 model and hold its output.
UNDECLARED = ExportMemory(fp32_factor=1.0, output_factor=1.0)


def export_memory(target: Any, cfg: MistralConfig, precision: str) -> int:
    return getattr(target, "export_memory", UNDECLARED).bytes(cfg, precision)


def validation_memory(cfg: MistralConfig, precision: str) -> int:
    """Validation holds the fp32 reference and the runtime's copy of the artifact's weights."""
    params = parameter_count(cfg)
    return int(BASELINE_BYTES + 4 * params + WEIGHT_BYTES.get(precision, 4.0) * params)


def job_resource(target: Any, device: str, options: Any) -> str | None:
    """The device resource a node needs to build and validate this (device, options), or None for any CPU node."""
    pick = getattr(target, "job_resource", None)
    if callable(pick):
        return pick(device, options)
    return getattr(target, "device_resources", {}).get(device)


def device_checks(target: Any) -> tuple[str, ...]:
    """Resources of the checks that run only on a device, after a build on any node (Core ML predict: macos)."""
    return tuple(getattr(target, "device_checks", ()))
