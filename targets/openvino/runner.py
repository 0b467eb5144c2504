"""Runners for the two IR forms, plus device resolution and compilation.

StatefulRunner drives the stateful IR: the KV cache lives in OpenVINO variables (the CPU plugin's
fused cache) and grows by each chunk; the runner keeps only the attention_mask of the slots it fed.
When the slots would exceed twice the capacity it compacts: every row keeps its last `capacity`
real slots (all a future query can see: the window, or the whole context), right-aligned. The mask
counts are relative, so nothing is renumbered, and memory stays bounded by the capacity.

StatelessRunner drives the canonical ring-buffer IR with explicit caches, like the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import TargetUnavailable, UserError
from exporter.trace_cache import runtime_cache
from targets.buffers import Recycler
from targets.openvino.options import DEVICES


def core_with_cache() -> Any:
    """An OpenVINO Core whose compiled blobs are cached (keyed by OpenVINO on model and config) in a
    folder only this user can write, unless caching is off (--no-cache)."""
    import openvino as ov

    core = ov.Core()
    cache_dir = runtime_cache("openvino-compiled")
    if cache_dir is not None:
        core.set_property({"CACHE_DIR": str(cache_dir)})
    return core


def resolve_device(core: Any, device: str) -> str:
    """Our device name -> OpenVINO's, refusing one that is not present here."""
    name = DEVICES[device]
    available = list(core.available_devices)
    if name != "AUTO" and not any(d == name or d.startswith(name + ".") for d in available):
        raise TargetUnavailable(f"OpenVINO device {name} is not present on this machine; available devices: "
                                f"{', '.join(available) or 'none'}. Pick one of them with --device "
                                f"({', '.join(k for k, v in DEVICES.items() if v in available or v == 'AUTO')})")
    return name


def compile_config(core: Any, device: str, hints: dict[str, str], threads: int) -> dict[str, str]:
    """The properties to compile with: only those the device supports (NPU has no KV_CACHE_PRECISION).

    An f16 inference hint on a device without FP16 arithmetic would silently run bf16, which has fewer
    mantissa bits than fp16: such a device computes in f32 instead (weights and cache stay f16)."""
    supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    config = {"PERFORMANCE_HINT": "LATENCY", **hints}
    if config.get("INFERENCE_PRECISION_HINT") == "f16" and device != "AUTO" \
            and "FP16" not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return {k: v for k, v in config.items() if device == "AUTO" or k in supported}


RAW_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


class _Base:
    """What both runners share: the compiled model, its request and the device description."""

    def __init__(self, compiled: Any, core: Any, device: str, capacity: int, window: int | None) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.core = core
        self.device = device
        self.capacity = capacity
        self.window = window
        self.vocab = compiled.output("logits").get_partial_shape()[-1].get_length()
        self._outputs = Recycler()
        threads = self._property("INFERENCE_NUM_THREADS")
        self.threads = int(threads) if threads is not None else None
        # Set by the target's load(): compiles the IR again, with a LoRA adapter file applied (or None).
        self.reopen: Callable[[Path | None], Any] | None = None

    def set_adapter(self, path: Path | None) -> None:
        """Run with this LoRA adapter file (adapters/<name>.safetensors) after the next reset(); None: the
        base. The IR is compiled again with the adapter's low-rank path beside each MatMul it adapts."""
        if self.reopen is None:
            raise UserError("this runner was not opened by its target and cannot switch adapters")
        self.compiled = self.reopen(path)
        self.request = self.compiled.create_infer_request()
        self.slots = None

    def _fresh_logits(self, shape: tuple[int, ...]) -> np.ndarray:
        """An array the request writes the logits into: returned without a copy, and not written again
        while the caller holds it (targets/buffers.py)."""
        import openvino as ov

        logits = self._outputs.take((*shape, self.vocab), np.float32)
        self.request.set_tensor("logits", ov.Tensor(logits, shared_memory=True))
        return logits

    def _property(self, name: str) -> Any:
        try:
            return self.compiled.get_property(name)
        except RuntimeError:  # a property this device does not report
            return None

    def describe_device(self) -> dict[str, Any]:
        """The device and the precisions the runtime actually resolved."""
        def text(name: str) -> str | None:
            value = self._property(name)
            return None if value is None else getattr(value, "get_type_name", lambda: str(value))()

        return {"openvino_device": self.device, "name": self.core.get_property(self.device.split(".")[0],
                                                                               "FULL_DEVICE_NAME")
                if self.device != "AUTO" else "AUTO",
                "inference_precision": text("INFERENCE_PRECISION_HINT"),
                "kv_cache_precision": text("KV_CACHE_PRECISION")}


class StatefulRunner(_Base):
    """The stateful IR: inputs input_ids, position_ids, attention_mask, beam_idx; output logits."""

    def reset(self, batch_size: int) -> None:
        if getattr(self, "slots", None) is not None and self.slots.shape[0] != batch_size:
            # Measured on openvino 2026.4 CPU: after reset_state, a larger batch than the request last ran
            # reads stale cache rows in the fused SDPA-with-KV-cache kernel (rows beyond the old batch
            # were off by up to 5 logits). A fresh request per batch size has no such state.
            self.request = self.compiled.create_infer_request()
        self.request.reset_state()
        self.slots = np.zeros((batch_size, 0), dtype=np.int64)  # 1 = a real token in that cache slot
        self.beam_idx = np.arange(batch_size, dtype=np.int32)

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.slots.shape[1] + input_ids.shape[1] > 2 * self.capacity:
            self._compact()
        mask = np.concatenate([self.slots, (positions >= 0).astype(np.int64)], axis=1)
        logits = self._fresh_logits(input_ids.shape)
        self.request.infer({"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
                            "attention_mask": mask, "beam_idx": self.beam_idx}, share_inputs=True)
        self.slots = mask
        return logits

    def _compact(self) -> None:
        """Keep each row's last `capacity` real slots, right-aligned; drop the rest of the cache."""
        import openvino as ov

        rows = [np.flatnonzero(row)[-self.capacity:] for row in self.slots]
        width = max(len(r) for r in rows)
        slots = np.zeros((len(rows), width), dtype=np.int64)
        for b, kept in enumerate(rows):
            slots[b, width - len(kept):] = 1
        for state in self.request.query_state():
            old = state.state.data  # [B, kv_heads, S, head_dim]
            new = np.zeros(old.shape[:2] + (width,) + old.shape[3:], dtype=old.dtype)
            for b, kept in enumerate(rows):
                new[b, :, width - len(kept):] = old[b][:, kept]
            state.state = ov.Tensor(new, list(new.shape), state.state.element_type)
        self.slots = slots


class StatelessRunner(_Base):
    """The canonical ring-buffer IR: caches in and out as explicit tensors, held here between steps."""

    def __init__(self, compiled: Any, core: Any, device: str, capacity: int, window: int | None,
                 kv_heads: int, head_dim: int) -> None:
        super().__init__(compiled, core, device, capacity, window)
        self.cache_dims = (kv_heads, capacity, head_dim)
        self.past = {p.get_any_name(): p.get_element_type() for p in compiled.inputs
                     if p.get_any_name().startswith("past_")}

    def reset(self, batch_size: int) -> None:
        # Raw storage per element type: bf16 has no numpy dtype, its bits travel as uint16.
        self.caches = {name: np.zeros((batch_size, *self.cache_dims), dtype=RAW_DTYPES[kind.get_type_name()])
                       for name, kind in self.past.items()}

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import openvino as ov

        inputs = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                  "positions": np.ascontiguousarray(positions, dtype=np.int64)}
        inputs.update({name: ov.Tensor(data, list(data.shape), self.past[name]) for name, data in self.caches.items()})
        logits = self._fresh_logits(input_ids.shape)
        self.request.infer(inputs, share_inputs=True)
        self.caches = {name: self.request.get_tensor(name.replace("past_", "present_", 1)).data.copy()
                       .view(RAW_DTYPES[self.past[name].get_type_name()]) for name in self.past}
        return logits


def compile_model(xml: Path, device: str, hints: dict[str, str], threads: int,
                  adapter: Path | None = None) -> tuple[Any, Any, str]:
    """Read and compile an IR on one of our device names, with a LoRA adapter file applied if given;
    returns (compiled, core, OpenVINO device)."""
    core = core_with_cache()
    name = resolve_device(core, device)
    model: Any = str(xml)
    if adapter is not None:
        from targets.openvino.lora import apply_adapter

        model = core.read_model(str(xml))
        apply_adapter(model, adapter)
    return core.compile_model(model, name, compile_config(core, name, hints, threads)), core, name
