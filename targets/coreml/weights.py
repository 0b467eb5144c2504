"""Weights into a converted MIL program, one at a time, in place of the trace's placeholders.

coremltools converts an in-memory torch program and copies every weight on the way (the bound fp32
program, its MIL consts, their fp16 casts: 1.7x the fp32 weights at best, 3.6x with coremltools' own
fp16 pass). The weights do not change the program, so the target converts the weight-free program
(zero-stride placeholders, exporter.trace) to MIL and then replaces each placeholder const with the
real weight, read from the source in blocks of rows into its final dtype: in memory are the program's
own consts, the output's size, plus one block in flight.

Placeholders are all zero, so conversion must not use their values: `const_deduplication` (which would
merge equal placeholders of equal shape) does not run before binding, and binding checks that every
parameter has exactly one const of its name, shape and dtype. Anything else is an error, never a
silently unbound weight. The fp16 overflow rule that coremltools applies to fp32 constants (keep the op
in fp32) is applied to the real weights here, and refuses instead: such a checkpoint needs fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from exporter.checkpoint import Rows
from exporter.errors import UserError
from targets.base import chunks
from targets.coreml.fp16_pass import overflows

_BLOCK_ELEMENTS = 1 << 24  # rows read at a time: 64 MiB in fp32 (a generated preset makes each block whole)


def mil_name(name: str, fp16: bool) -> str:
    """The MIL const of a torch parameter: the wrapper's attribute path, cast to fp16 when computing in fp16."""
    return "p_canonical_" + name.replace(".", "_") + ("_to_fp16" if fp16 else "")


def dense(rows: Rows, dtype: type, check_fp16: bool) -> np.ndarray:
    """The weight in dtype, converted block of rows by block into its final array (never whole in fp32)."""
    shape = rows.shape
    out = np.empty(shape, dtype)
    step = max(1, _BLOCK_ELEMENTS // max(1, int(np.prod(shape[1:]))))
    for start, stop in chunks(shape[0], step):
        block = rows[start:stop].float().numpy()
        if check_fp16 and overflows(block):
            raise UserError(f"weight {rows.name} holds values beyond fp16's range (|x| > 65504); "
                            "build this checkpoint with --precision fp32")
        out[start:stop] = block
    return out


def _replace_const(function: object, old: object, value: np.ndarray) -> object:
    """Put a const of `value` in place of `old`, under its name (as readback and apps see it) and with its
    scopes (where it came from in the torch program, which coremltools checks); returns the new op."""
    from coremltools.converters.mil import Builder as mb

    new = mb.const(val=value, name=f"{old.name}_new", before_op=old)  # type: ignore[attr-defined]
    function.replace_uses_of_var_after_op(anchor_op=old, old_var=old.outputs[0], new_var=new)  # type: ignore[attr-defined]
    function.remove_ops([old])  # type: ignore[attr-defined]
    new.op.name = new.name = old.name  # type: ignore[attr-defined]
    new.op.scopes = old.scopes  # type: ignore[attr-defined]
    return new.op


def bind_mil(program: object, names: Iterable[str], rows: Callable[[str], Rows], fp16: bool,
             shared: dict[str, np.ndarray]) -> None:
    """Replace each parameter's placeholder const in the program's main function with its weight.

    `shared` holds the arrays already read for another function of the same part: every function binds
    the same array, so a part's weights are in memory once however many functions it has."""
    function = program.functions["main"]  # type: ignore[attr-defined]
    consts = {op.name: op for op in function.operations if op.op_type == "const"}
    dtype = np.float16 if fp16 else np.float32
    with function:
        for name in names:
            key = mil_name(name, fp16)
            old = consts.pop(key, None)
            if old is None:
                raise RuntimeError(f"the converted program has no const {key} for weight {name}")
            value = shared.get(name)
            if value is None:
                value = shared[name] = dense(rows(name), dtype, fp16)
            stub = old.outputs[0]
            if tuple(stub.shape) != value.shape or stub.val.dtype != dtype:
                raise RuntimeError(f"const {key} is {tuple(stub.shape)} {stub.val.dtype}, the weight {value.shape} {dtype}")
            _replace_const(function, old, value)


def share_consts(function: object, earlier: dict[str, object]) -> None:
    """Point a function's consts at the equal, same-named consts of the part's functions converted before
    it: one array in memory and one blob entry in the package each (coremltools' weight_id).

    coremltools' save_multifunction finds such duplicates by comparing every constant of every function
    with np.allclose, which at 7B takes minutes and several copies of the largest weight; here the bound
    weights are already one array (bind_mil's `shared`) and compressed ones are compared exactly once."""
    with function:  # type: ignore[attr-defined]
        for op in list(function.operations):  # type: ignore[attr-defined]
            value = op.outputs[0].val if op.op_type == "const" else None
            if not isinstance(value, np.ndarray):
                continue
            first = earlier.setdefault(op.name, op)
            known = first.outputs[0].val  # type: ignore[attr-defined]
            if first is op or known.dtype != value.dtype or known.shape != value.shape or not (
                    known is value or np.array_equal(known, value)):
                continue
            if first.weight_id is None:  # type: ignore[attr-defined]
                first.weight_id = f"shared/{op.name}"  # type: ignore[attr-defined]
            if known is not value:  # an equal copy (a compressed weight): the first one's array replaces it
                op = _replace_const(function, op, known)
            op.weight_id = first.weight_id  # type: ignore[attr-defined]
