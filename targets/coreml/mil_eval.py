"""Execute a Core ML program's MIL on any OS, op by op, with coremltools' own value inference.

Core ML cannot predict off macOS, but every MIL op class in coremltools carries a ``value_inference``
(numpy) that the converter uses for constant folding. This interpreter feeds real inputs and states
through those, in the dtypes the program declares (fp16 where it computes in fp16), so what it checks
is the converted program itself. It is a reference-level execution ("mil-reference"), not a device run.

Compressed weights (``constexpr_*`` ops) are materialised by their ``materialized_val_inference``.
Products (``linear``, ``matmul``, ``scaled_dot_product_attention``) multiply fp16 operands with fp32
accumulation and round the result to the declared dtype, as Core ML's fp16 backends accumulate. torch
computes them: its fp16 GEMM accumulates in fp32 (tests/test_coreml.py checks that against float64),
reads fp16 weights as they are, and its softmax takes -inf masks at speed; numpy's own fp16 matmul runs
without BLAS, and widening the weights to fp32 on every call cost 9 s of each 7B-dims decode step.
State ops are interpreted by their definition: ``read_state`` returns the state, ``coreml_update_state``
writes it (as the fp16 the state type holds) and returns the value. Ops without value inference in
coremltools are listed in ``_SUPPLEMENT``; anything else it cannot evaluate raises ``MilEvalError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


class MilEvalError(RuntimeError):
    """An op of the program cannot be evaluated by value inference."""


def _silu(op: Any, env: dict[int, np.ndarray]) -> np.ndarray:
    x = env[id(op.x)]
    return (x / (1 + np.exp(-x.astype(np.float32)))).astype(x.dtype)


def _value(var: Any, env: dict[int, np.ndarray]) -> np.ndarray:
    return env[id(var)] if id(var) in env else np.asarray(var.val)


def _f32(var: Any, env: dict[int, np.ndarray]) -> np.ndarray:
    return _value(var, env).astype(np.float32, copy=False)


def _rounded(op: Any, value: np.ndarray) -> np.ndarray:
    return value.astype(_np_dtype(op.outputs[0]), copy=False)


def _operands(op: Any, env: dict[int, np.ndarray], *variables: Any) -> list[torch.Tensor]:
    """torch views of the operands: fp16 where they and the result are fp16 (fp32 accumulation inside
    the GEMM), fp32 otherwise, so nothing is rounded to fp16 that the program keeps wider."""
    values = [np.asarray(_value(var, env)) for var in variables]
    half = _np_dtype(op.outputs[0]) == np.float16 and all(v.dtype == np.float16 for v in values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only weight buffers: never written here
        return [torch.from_numpy(v).to(torch.float16 if half else torch.float32) for v in values]


def _linear(op: Any, env: dict[int, np.ndarray]) -> np.ndarray:
    x, weight, *bias = _operands(op, env, op.x, op.weight, *([op.bias] if op.bias is not None else []))
    return _rounded(op, torch.nn.functional.linear(x, weight, *bias).numpy())


def _matmul(op: Any, env: dict[int, np.ndarray]) -> np.ndarray:
    x, y = _operands(op, env, op.x, op.y)
    if op.transpose_x.val:
        x = x.transpose(-1, -2)
    if op.transpose_y.val:
        y = y.transpose(-1, -2)
    return _rounded(op, (x @ y).numpy())


def _sdpa(op: Any, env: dict[int, np.ndarray]) -> np.ndarray:
    """iOS18 scaled_dot_product_attention by its spec: softmax(q k^T / sqrt(d) + mask) v, in fp32."""
    q, k, v = (torch.from_numpy(_f32(var, env)) for var in (op.query, op.key, op.value))
    scores = q @ k.transpose(-1, -2) / float(np.sqrt(q.shape[-1]))
    if op.attn_mask is not None:
        mask = torch.from_numpy(np.asarray(_value(op.attn_mask, env)))
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return _rounded(op, (torch.softmax(scores, dim=-1) @ v).numpy())


# Ops coremltools gives no value inference for, with their MIL-spec definitions in numpy, and the
# products evaluated with fp32 accumulation (see the module docstring).
_SUPPLEMENT: dict[str, Callable[[Any, dict[int, np.ndarray]], np.ndarray]] = {
    "silu": _silu, "linear": _linear, "matmul": _matmul, "scaled_dot_product_attention": _sdpa}


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def _value_inference(op: Any, env: dict[int, np.ndarray]) -> tuple[Any, ...]:
    """Bind the op's non-const inputs to concrete values, infer, and unbind."""
    bound = []
    try:
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                if id(var) in env:
                    wrapper = var.sym_type()
                    wrapper.val = env[id(var)]
                    bound.append((var, var._sym_val))
                    var._sym_val = wrapper
        result = op.value_inference()
    except (NotImplementedError, AttributeError, TypeError, ValueError) as exc:
        raise MilEvalError(f"cannot evaluate MIL op '{op.op_type}' ({op.name}) by value inference: {exc}") from exc
    finally:
        for var, old in bound:
            var._sym_val = old
    if result is None:
        raise MilEvalError(f"MIL op '{op.op_type}' ({op.name}) returned no value")
    return result if isinstance(result, tuple) else (result,)


def _materialize(op: Any) -> np.ndarray:
    """Decompressed value of a constexpr op (cached on the op: it is constant)."""
    cached = getattr(op, "_materialized", None)
    if cached is None:
        try:
            cached = np.asarray(op.materialized_val_inference())
        except (NotImplementedError, AttributeError) as exc:
            raise MilEvalError(f"cannot materialise MIL op '{op.op_type}' ({op.name}): {exc}") from exc
        op._materialized = cached
    return cached


def normalize_scalars(program: Any) -> None:
    """Turn numpy bool consts (as loaded from the proto) into Python bools: some value inferences
    pass them straight to numpy 2.x, which rejects np.bool_ as `keepdims`."""
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.bool_):
                var = op.outputs[0]
                wrapper = var.sym_type()
                wrapper.val = var.val.item()
                var._sym_val = wrapper


def run_function(function: Any, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one MIL function; `states` (name -> fp16 array) is updated in place."""
    env: dict[int, np.ndarray] = {}
    for name, var in function.inputs.items():
        if name in states:
            env[id(var)] = states[name]
        elif name in inputs:
            env[id(var)] = np.asarray(inputs[name]).astype(_np_dtype(var))
        else:
            raise MilEvalError(f"input '{name}' of the MIL function was not given")
    for op in function.operations:
        outputs = op.outputs
        if op.op_type == "const":
            env[id(outputs[0])] = outputs[0].val
        elif op.op_type == "read_state":
            env[id(outputs[0])] = states[op.input.name].copy()
        elif op.op_type == "coreml_update_state":
            states[op.state.name] = env[id(op.value)].astype(states[op.state.name].dtype)
            env[id(outputs[0])] = states[op.state.name].copy()
        elif op.op_type.startswith("constexpr_"):
            # Compressed weights: coremltools materialises them with its own decompression.
            env[id(outputs[0])] = _materialize(op)
        elif op.op_type in _SUPPLEMENT:
            env[id(outputs[0])] = _SUPPLEMENT[op.op_type](op, env)
        else:
            for out, value in zip(outputs, _value_inference(op, env)):
                env[id(out)] = np.asarray(value)
    return {var.name: env[id(var)] for var in function.outputs}


def op_types(function: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in function.operations:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts
