"""coremltools' fp16 compute pass with a memory-bounded overflow check.

`common::add_fp16_cast` (FP16ComputePrecision) keeps an op in fp32 when one of its fp32 constants holds
a finite value beyond fp16's range. Its check runs `np.abs` and `np.where` over each whole constant:
a full fp32 copy plus int64 indices for every element, about 7 bytes of temporaries per weight byte
of the largest tensor, and 75 % of the conversion time of a 7B-dims layer (15.7 of 20.9 s, peak
3.33 GiB against 1.80 GiB without it; benchmarks/coreml_part_memory.py). This pass makes the same
decision (the largest |value| below 1e38 above 65504) block by block, with no index arrays, and is
otherwise coremltools' own pass.

It also keeps the weight-free program weight-free. coremltools casts each fp32 const when it inserts
the cast (pymil infers the value of an op on consts at once), which turns every zero-stride placeholder
(targets/coreml/weights.py) into a dense fp16 array, and its underflow check flattens it into a dense
fp32 copy: half, and for a moment one and a half, the part's fp32 weight bytes, only to be replaced
by the real weights when they are bound. A placeholder's cast is made here as the zero-stride fp16
const it would fold into, under the same name.

And it keeps the rotary tables in fp32: the angles `position * inv_freq` reach max_position_embeddings
radians, where fp16's spacing is 2 or more (and positions past 2048 are not even exact), so in fp16 the
logits drift from position ~100 on (0.05 at 500, 1.0 at 3000 on the tiny preset). Only the ops that
compute cos and sin stay fp32; the tables are cast to fp16 where they meet q and k (|value| <= 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

NAME = "mistral_export::add_fp16_cast"
_BLOCK = 1 << 20  # elements per step: 4 MiB of temporaries
_FP16_MAX = 65504.0
_INFINITE = 1e38  # what coremltools counts as an infinity (a mask's -inf), which may become fp16 inf


def overflows(value: np.ndarray) -> bool:
    """True when a finite value of `value` is beyond fp16's range (coremltools' own criterion)."""
    flat = np.asarray(value).reshape(-1)
    for start in range(0, flat.size, _BLOCK):
        block = np.abs(flat[start:start + _BLOCK])
        if np.max(block, initial=0.0, where=block < _INFINITE) > _FP16_MAX:
            return True
    return False


def rotary_ops(prog: Any) -> set[int]:
    """ids of the ops that compute the rotary tables: every cos and sin op and the non-const ops they
    depend on (the positions input, cast, multiplied by inv_freq, concatenated)."""
    keep: set[int] = set()
    stack = [op for function in prog.functions.values() for op in function.operations if op.op_type in ("cos", "sin")]
    while stack:
        op = stack.pop()
        if id(op) in keep or op.op_type == "const":
            continue
        keep.add(id(op))
        for inputs in op.inputs.values():
            stack += [var.op for var in (inputs if isinstance(inputs, (list, tuple)) else (inputs,)) if var.op is not None]
    return keep


def placeholder(var: Any) -> bool:
    """A weight placeholder: a const whose value is one element broadcast to its shape (no memory)."""
    value = var.val if var.op is not None and var.op.op_type == "const" else None
    return isinstance(value, np.ndarray) and value.size > 1 and not any(value.strides)


class _Builder:
    """coremltools' op builder, except that a placeholder's fp16 cast is the fp16 placeholder itself."""

    def __init__(self, builder: Any) -> None:
        self._builder = builder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._builder, name)

    def cast(self, x: Any, dtype: str, name: str | None = None, before_op: Any = None) -> Any:
        if dtype == "fp16" and placeholder(x):
            value = np.broadcast_to(np.zeros((), np.float16), x.val.shape)
            return self._builder.const(val=value, name=name, before_op=before_op)
        return self._builder.cast(x=x, dtype=dtype, name=name, before_op=before_op)


@contextlib.contextmanager
def _placeholder_casts(module: Any) -> Iterator[None]:
    builder = module.mb
    module.mb = _Builder(builder)
    try:
        yield
    finally:
        module.mb = builder


def register() -> str:
    """Register the pass (once) and return its name for a PassPipeline."""
    from targets.coreml.lower import quiet_coremltools  # lower imports this module

    quiet_coremltools()
    from coremltools.converters.mil.mil.passes.defs import quantization
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if NAME in PASS_REGISTRY:
        return NAME

    @register_pass(namespace="mistral_export", name="add_fp16_cast")
    class BoundedFP16Cast(add_fp16_cast):  # type: ignore[misc, valid-type]
        @staticmethod
        def fp16_overflow(op: Any) -> bool:
            for inputs in op.inputs.values():
                for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
                    if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                            and not placeholder(var) and overflows(var.op.val.val)):
                        return True
            return False

        def is_valid_op(self, op: Any) -> bool:
            return id(op) not in self._rotary and super().is_valid_op(op)

        def apply(self, prog: Any) -> None:
            self._rotary = rotary_ops(prog)
            with _placeholder_casts(quantization):
                super().apply(prog)

        def _check_underflow_to_zero(self, new_var: Any, var: Any) -> None:
            if not placeholder(var):  # a placeholder is all zero: nothing can underflow
                super()._check_underflow_to_zero(new_var, var)

    return NAME


def use_in(pipeline: Any) -> Any:
    """The pipeline with coremltools' fp16 pass replaced by this one, at the same place."""
    passes = list(pipeline.passes)
    index = passes.index("common::add_fp16_cast")
    pipeline.remove_passes({"common::add_fp16_cast"})
    pipeline.insert_pass(index, register())
    return pipeline
