"""Parity gates: one declared table of thresholds per precision, and their evaluation.

Upper bounds: max_abs, mean_abs (logit units), kl (nats, worst position). Lower bounds: cosine (worst
position), top1 (fraction of positions whose argmax agrees), and the greedy token-match rates.
The defaults and the measurements behind them are in validation/README.md ("Gate table").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.errors import UserError
from validation.metrics import StepMetrics

UPPER = ("max_abs", "mean_abs", "kl")
LOWER = ("cosine",)
# top1 is gated over all compared positions: a decode step has only B positions, so a per-step
# fraction jumps in steps of 1/B and one near-tie would decide the gate.
POOLED = ("top1",)
GENERATION = ("teacher_forced_match", "free_running_match")

GATES: dict[str, dict[str, float]] = {
    # Defaults set from measurements on the tiny preset (random weights, logits of order 1), worst
    # target first, with about 2x margin. fp32: kernels differ only in summation order (ORT 1.9e-6,
    # OpenVINO 1.8e-6 max_abs).
    "fp32": {"max_abs": 1e-4, "mean_abs": 1e-5, "kl": 1e-6, "cosine": 0.99999, "top1": 0.99,
             "teacher_forced_match": 0.99, "free_running_match": 0.9},
    # fp16: Core ML MIL max_abs 7.4e-3 / mean 1.3e-3, ORT 4.2e-3, TensorRT ONNX on ORT 3.6e-3, OpenVINO
    # 2.9e-3 (f16 weights and cache; on CPUs without f16 arithmetic the runner computes in f32, since an
    # f16 hint there silently runs bf16 and measured 3.9e-2).
    "fp16": {"max_abs": 2e-2, "mean_abs": 3e-3, "kl": 1e-3, "cosine": 0.999, "top1": 0.95,
             "teacher_forced_match": 0.95, "free_running_match": 0.5},
    # bf16 keeps 8 mantissa bits: OpenVINO CPU max_abs 0.049 / mean 0.009 / kl 1e-4.
    "bf16": {"max_abs": 1e-1, "mean_abs": 2e-2, "kl": 1e-2, "cosine": 0.995, "top1": 0.9,
             "teacher_forced_match": 0.9, "free_running_match": 0.3},
    # Weight-only int8: OpenVINO (bf16 activations) 0.095 / 0.017 / 4.5e-4, ORT 0.082 / 0.016,
    # Core ML 0.078 / 0.014.
    "int8": {"max_abs": 2e-1, "mean_abs": 4e-2, "kl": 1e-2, "cosine": 0.995, "top1": 0.9,
             "teacher_forced_match": 0.9, "free_running_match": 0.3},
    # Weight-only int4 (block/group 32 scales): ORT MatMulNBits kl 0.026, cosine 0.973, top1 0.66;
    # OpenVINO NNCF kl 0.026, cosine 0.974, top1 0.76; Core ML per-block kl 0.059, cosine 0.941, top1 0.70. Random models have near-tied logits, so top-1 is a weak int4 criterion; KL and cosine
    # carry the gate. A swapped KV head (kl 0.87, cosine 0.23) fails it; a subtler defect such as a
    # window off by one (kl 0.08, cosine 0.91) hides in int4 noise at this width and is caught by the
    # same target's fp32/fp16 gates.
    "int4": {"max_abs": float("inf"), "mean_abs": float("inf"), "kl": 0.1, "cosine": 0.9, "top1": 0.5,
             "teacher_forced_match": 0.5, "free_running_match": 0.0},
}
# Fidelity rows: the arithmetic a quantized artifact's runtime really uses, against the canonical model
# bound to the artifact's own dequantized weights (validation/fidelity.py). From
# benchmarks/gate_calibration.py, worst clean of the tiny preset and a 512-wide model -> gate -> least
# window-off-by-one: int8-activations (ONNX Runtime MatMulNBits accuracy_level 4, int8 and int4): kl
# 1.8e-4 -> 2e-3 -> 0.040; max_abs 0.076 -> 0.25 -> 1.04; corpus mean KL 1.1e-4 -> 1e-3 -> 4.2e-3; KL p99
# 1.4e-4 -> 2e-3 -> 0.034. u8-kv-cache (OpenVINO CPU default: f32 arithmetic, u8 KV cache): kl 2.0e-5 ->
# 5e-4 -> 0.045; max_abs 0.026 -> 0.1 -> 1.04; corpus mean KL 5.8e-6 -> 1e-4 -> 4.2e-3; KL p99 1.7e-5 ->
# 5e-4 -> 0.034. Swapped heads and perturbed scales fail the exact stored-weight check instead.
GATES["int8-activations"] = {"max_abs": 0.25, "mean_abs": 4e-2, "kl": 2e-3, "cosine": 0.999, "top1": 0.95,
                             "teacher_forced_match": 0.95, "free_running_match": 0.3}
GATES["u8-kv-cache"] = {"max_abs": 0.1, "mean_abs": 2e-2, "kl": 5e-4, "cosine": 0.999, "top1": 0.95,
                        "teacher_forced_match": 0.95, "free_running_match": 0.3}
# Corpus gates (validation/corpus.py), per row: mean KL and its 99th percentile over every scored
# position. Worst clean measured (same script) -> gate: fp32 7e-13 / 1e-12 -> 1e-8 / 1e-7; fp16 (Core ML
# MIL worst) 7e-7 / 1.5e-6 -> 5e-5 / 5e-4; bf16 (the reference target's torch bf16) 3.7e-5 / 7.4e-5 ->
# 3e-4 / 1e-3; int8 quality 2.2e-4 / 3.0e-4 -> 2e-3 / 3e-3; int4 quality (Core ML per block) 0.024 /
# 0.043 -> 0.06 / 0.12.
CORPUS = ("corpus_mean_kl", "corpus_kl_p99")
_CORPUS_GATES = {"fp32": (1e-8, 1e-7), "fp16": (5e-5, 5e-4), "bf16": (3e-4, 1e-3), "int8": (2e-3, 3e-3),
                 "int4": (0.06, 0.12), "int8-activations": (1e-3, 2e-3), "u8-kv-cache": (1e-4, 5e-4)}
for _name, (_mean, _p99) in _CORPUS_GATES.items():
    GATES[_name].update(corpus_mean_kl=_mean, corpus_kl_p99=_p99)
# Precisions named by a target for its own formats map onto a row of the table.
ALIASES = {"palette4": "int4"}


def corpus_failures(stats: dict[str, Any], gates: dict[str, float]) -> list[GateFailureItem]:
    """The corpus statistics against the row's corpus gates."""
    values = {"corpus_mean_kl": stats["mean_kl"], "corpus_kl_p99": stats["kl_percentiles"]["p99"]}
    return [GateFailureItem(m, "corpus", values[m], gates[m], "max") for m in CORPUS
            if m in gates and not values[m] <= gates[m]]


def gates_for(precision: str) -> dict[str, float]:
    key = ALIASES.get(precision, precision)
    if key not in GATES:
        raise UserError(f"no gate table for precision '{precision}'; valid: {', '.join(GATES)}")
    return GATES[key]


def loosest(*rows: dict[str, float]) -> dict[str, float]:
    """Per metric, the most permissive of several rows: used when the reference itself is bf16, so
    the target can be held to no more than what a bf16 reference can resolve."""
    return {m: (max if m in UPPER + CORPUS else min)(row[m] for row in rows) for m in rows[0]}


@dataclass(frozen=True)
class GateFailureItem:
    """One broken threshold: which metric, at which step, its value and the bound."""

    metric: str
    step: str
    value: float
    threshold: float
    bound: str

    def __str__(self) -> str:
        sign = "<=" if self.bound == "max" else ">="
        return f"{self.metric} at {self.step} = {self.value:.4g}, must be {sign} {self.threshold:.4g}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step, "value": self.value, "threshold": self.threshold,
                "bound": self.bound}


def evaluate(steps: list[StepMetrics], generation: dict[str, float], gates: dict[str, float]) -> list[GateFailureItem]:
    """Every broken threshold over every step and the generation rates, collected in one list."""
    failures = []
    for s in steps:
        for metric in UPPER:
            value = getattr(s, metric)
            if not value <= gates[metric]:
                failures.append(GateFailureItem(metric, s.step, value, gates[metric], "max"))
        for metric in LOWER:
            value = getattr(s, metric)
            if not value >= gates[metric]:
                failures.append(GateFailureItem(metric, s.step, value, gates[metric], "min"))
    positions = sum(s.positions for s in steps)
    for metric in POOLED:
        value = sum(getattr(s, metric) * s.positions for s in steps) / max(positions, 1)
        if not value >= gates[metric]:
            failures.append(GateFailureItem(metric, "all positions", value, gates[metric], "min"))
    for metric in GENERATION:
        if metric in generation and not generation[metric] >= gates[metric]:
            failures.append(GateFailureItem(metric, "generation", generation[metric], gates[metric], "min"))
    return failures
