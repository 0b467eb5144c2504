"""Runners: an InferenceSession driven through IO binding, holding a preallocated cache.

GQA form: one cache buffer per layer and K/V, bound both as past and as present, so GQA updates it
in place (ORT's shared past/present buffer) and no step copies the cache. The runner tracks how
many tokens each row holds, which is what attention_mask tells GQA. The buffer has a few rows of
slack over the window: GQA then compacts the window once every slack+1 steps instead of every step.

Fallback form (standard Attention): the canonical ring cache comes in and goes out explicitly; two
preallocated buffers per cache alternate as past and present, again with no copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from exporter.errors import ArtifactError, TargetUnavailable, UserError
from targets.buffers import Recycler
from targets.onnxruntime.kernels import PROVIDERS

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32, "int4": np.float32}


def check_external_data(model: Path, allowed: str) -> None:
    """Refuse an ONNX whose external-data locations name any file but `allowed` beside it: the runtime
    would otherwise open whatever path a tampered model.onnx names."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location != allowed:
                raise ArtifactError(f"{model.name}: tensor {tensor.name} keeps its data in {location!r}, not in "
                                    f"{allowed}; refused (rebuild the artifact)")


def session(model: Path, device: str, threads: int, data_file: str = "model.onnx.data",
            initializers: dict[str, ort.OrtValue] | None = None) -> ort.InferenceSession:
    """An InferenceSession on the device's execution provider with the given intra-op threads, and
    initializers overridden by name (a LoRA adapter's values)."""
    check_external_data(model, data_file)
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise TargetUnavailable(f"{provider} is not available in this onnxruntime "
                                f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu for cuda")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    return ort.InferenceSession(str(model), opts, providers=[provider])


class _BaseRunner:
    """What both forms share: the session, the logits binding and the argument checks."""

    def __init__(self, sess: ort.InferenceSession, device: str, capacity: int, window: int | None,
                 cache: dict[str, Any], threads: int) -> None:
        self.session = sess
        self.device = device
        self.capacity = capacity
        self.window = window
        self.threads = threads or None
        self.layers, self.kv_heads, self.head_dim = cache["num_layers"], cache["kv_heads"], cache["head_dim"]
        self.dtype = NP_DTYPES[cache["dtype"]]
        self._outputs = Recycler()
        logits = next(o for o in sess.get_outputs() if o.name == "logits")
        self.vocab = logits.shape[-1]
        self._logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        self.batch = 0
        self._io: ort.IOBinding | None = None
        self._inputs = {i.name for i in sess.get_inputs()}  # position_ids is optional (RoPE inside GQA)
        # Set by the target's load(): opens the session again with initializers overridden by name.
        self.reopen: Callable[[dict[str, ort.OrtValue]], ort.InferenceSession] | None = None
        self._adapter_values: dict[str, ort.OrtValue] = {}

    def set_adapter(self, path: Path | None) -> None:
        """Run with this LoRA adapter file (onnxruntime's adapter format) after the next reset(); None: the base.

        onnxruntime applies RunOptions.add_active_adapter in run() but not in run_with_iobinding(), which
        this runner needs for its in-place cache, and IOBinding cannot bind the LoRA inputs (overridable
        initializers). So the session is opened again with the adapter's values as those initializers:
        switching costs one session load; onnxruntime-genai switches per generator instead."""
        values = {} if path is None else dict(ort.AdapterFormat.read_adapter(str(path)).get_parameters())
        known = {i.name for i in self.session.get_overridable_initializers()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ArtifactError(f"adapter {path} holds {unknown[0]}, which is not a LoRA input of this model")
        if self.reopen is None:
            raise UserError("this runner was not opened by its target and cannot switch adapters")
        self.session = self.reopen(values)
        self._adapter_values = values  # the session reads them: they live as long as it does
        self._io, self.batch = None, 0

    def _buffer(self, rows: int) -> ort.OrtValue:
        shape = [self.batch, self.kv_heads, rows, self.head_dim]
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device)

    def _check(self, ids: np.ndarray, positions: np.ndarray) -> None:
        if self._io is None:
            raise UserError("call reset(batch_size) before step()")
        if ids.shape != positions.shape or ids.ndim != 2 or ids.shape[0] != self.batch:
            raise UserError(f"input_ids {ids.shape} and positions {positions.shape} must both be "
                            f"[{self.batch}, T] (the batch given to reset)")
        if not 1 <= ids.shape[1] <= self.capacity:
            raise UserError(f"a step holds 1..{self.capacity} tokens (the cache capacity), got {ids.shape[1]}")

    def _run(self, feeds: dict[str, np.ndarray], tokens: int) -> np.ndarray:
        io = self._io
        assert io is not None
        for name, array in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array))
        logits = self._outputs.take((self.batch, tokens, self.vocab), self._logits_dtype)  # see targets/buffers.py
        io.bind_output("logits", "cpu", 0, self._logits_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits.astype(np.float32, copy=False)


class GqaRunner(_BaseRunner):
    """GroupQueryAttention form: genai IO, shared in-place cache, per-row token counts."""

    def __init__(self, sess: ort.InferenceSession, device: str, capacity: int, window: int | None,
                 cache: dict[str, Any], threads: int, buffer_rows: int, rotary_rows: int | None) -> None:
        super().__init__(sess, device, capacity, window, cache, threads)
        self.buffer_rows = buffer_rows
        self.rotary_rows = rotary_rows
        # Positions the artifact can serve (validation and bench keep within them): the fused RoPE table.
        self.max_positions = rotary_rows
        self.lengths = np.zeros(0, dtype=np.int64)

    def reset(self, batch_size: int) -> None:
        if batch_size != self.batch or self._io is None:
            self.batch = batch_size
            self._io = self.session.io_binding()
            for i in range(self.layers):
                for kind in ("key", "value"):
                    buf = self._buffer(self.buffer_rows)
                    self._io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                    self._io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.lengths = np.zeros(batch_size, dtype=np.int64)  # rows beyond a row's length are never read

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        self._check(ids, pos)
        counts = self._token_counts(pos)
        held = self.lengths + counts
        if not held.all():
            raise UserError(f"row(s) {np.flatnonzero(held == 0).tolist()} hold no token yet: a row's first "
                            "step needs at least one (non-padding) token")
        if self.window is None and held.max() > self.capacity:
            raise UserError(f"sequence of {held.max()} tokens exceeds the artifact's context of {self.capacity}; "
                            "rebuild with a larger --max-context")
        if self.rotary_rows is not None and held.max() > self.rotary_rows:
            raise UserError(f"position {held.max() - 1} is past the rotary table ({self.rotary_rows} positions, "
                            "max_position_embeddings); rebuild with --option fuse_rotary=false for longer sequences")
        mask = (np.arange(held.max())[None, :] < held[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        logits = self._run({k: v for k, v in feeds.items() if k in self._inputs}, ids.shape[1])
        self.lengths = held
        return logits

    def _token_counts(self, pos: np.ndarray) -> np.ndarray:
        """Valid tokens per row, checking right padding and that each row continues where it stopped."""
        valid = pos >= 0
        counts = valid.sum(axis=1)
        expected = self.lengths[:, None] + np.arange(pos.shape[1])[None, :]
        inside = np.arange(pos.shape[1])[None, :] < counts[:, None]
        if (valid != inside).any() or (pos[inside] != expected[inside]).any():
            raise UserError("positions must be right-padded with -1 and continue each row from the number "
                            f"of tokens it holds ({self.lengths.tolist()}); got {pos.tolist()}")
        return counts


class RingRunner(_BaseRunner):
    """Fallback form: canonical IO; past and present buffers swap roles after every step."""

    def reset(self, batch_size: int) -> None:
        if batch_size != self.batch or self._io is None:
            self.batch = batch_size
            self._io = self.session.io_binding()
            self._buffers = [[self._buffer(self.capacity) for _ in range(2 * self.layers)] for _ in range(2)]
        zeros = np.zeros((batch_size, self.kv_heads, self.capacity, self.head_dim), dtype=self.dtype)
        for buf in self._buffers[0]:
            buf.update_inplace(zeros)  # the canonical cache starts zeroed
        self._bind(0)

    def _bind(self, current: int) -> None:
        assert self._io is not None
        names = [(f"past_key.{i}", f"present_key.{i}") for i in range(self.layers)]
        names += [(f"past_value.{i}", f"present_value.{i}") for i in range(self.layers)]
        for (past, present), a, b in zip(names, self._buffers[current], self._buffers[1 - current]):
            self._io.bind_ortvalue_input(past, a)
            self._io.bind_ortvalue_output(present, b)
        self._current = current

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        self._check(ids, pos)
        logits = self._run({"input_ids": ids, "positions": pos}, ids.shape[1])
        self._bind(1 - self._current)
        return logits
