"""Which ONNX Runtime kernels each (execution provider, precision) pair gets: a declared table.

GroupQueryAttention has CPU kernels for fp32 and fp16 and CUDA kernels for fp16 and bf16 only;
pairs without one get the fallback, the canonical attention decomposed into the standard opset-23
Attention op plus scatters into a ring-buffer cache. Weights are MatMul in the float precisions and
MatMulNBits (weight-only, fp32 activations) for int8/int4. ORT has no fp16 or bf16 GEMM on x86
CPUs: cpu/fp16 stores fp16 weights and computes in fp32 (passes/upcast.py; it halves the file, not
the decode traffic), and bf16 has neither GQA nor GEMM on CPU, so it is not offered there.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UserError

GQA = "gqa"
ONNX_ATTENTION = "onnx-attention"
ATTENTION_CHOICES = ("auto", GQA, ONNX_ATTENTION)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class Kernels:
    """The attention form and the weight MatMul kernel of one (EP, precision) pair."""

    attention: str
    matmul: str

    def describe(self) -> str:
        attention = ("com.microsoft::GroupQueryAttention (window cache, shared in-place buffer)" if self.attention == GQA
                     else "ai.onnx::Attention opset 23 + ScatterElements ring cache (fallback)")
        return f"{attention}; {self.matmul}"


_MATMUL = {"fp32": "MatMul", "fp16": "MatMul", "bf16": "MatMul", "cpu/fp16": "MatMul over fp16 weights cast to fp32 at load",
           "int8": "com.microsoft::MatMulNBits bits=8", "int4": "com.microsoft::MatMulNBits bits=4"}
_GQA_DTYPES = {"cpu": ("fp32", "fp16", "int8", "int4"), "cuda": ("fp16", "bf16")}

SUPPORT: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "fp16", "int8", "int4"),
    "cuda": ("fp32", "fp16", "bf16", "int8", "int4"),
}
# Pairs built and validated on this project's CPU machines; CUDA entries follow ORT's kernel
# registrations and are not validated here (no GPU).
VALIDATED = {("cpu", p) for p in SUPPORT["cpu"]}


def table() -> dict[tuple[str, str], Kernels]:
    return {(d, p): Kernels(GQA if p in _GQA_DTYPES[d] else ONNX_ATTENTION, _MATMUL.get(f"{d}/{p}", _MATMUL[p]))
            for d, precisions in SUPPORT.items() for p in precisions}


def choose(device: str, precision: str, attention: str = "auto") -> Kernels:
    """The table's kernels for the pair, or the attention form the user forced."""
    if attention not in ATTENTION_CHOICES:
        raise UserError(f"option attention={attention!r} is not valid; choose one of {', '.join(ATTENTION_CHOICES)}")
    chosen = table()[(device, precision)]
    if attention == "auto" or attention == chosen.attention:
        return chosen
    if attention == GQA:
        raise UserError(f"GroupQueryAttention has no {device} kernel for {precision}; use attention=auto "
                        f"(GQA pairs: {', '.join(f'{d}/{p}' for d, ps in _GQA_DTYPES.items() for p in ps)})")
    return Kernels(ONNX_ATTENTION, chosen.matmul)
