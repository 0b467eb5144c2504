"""Per-step logit error statistics between a reference and a target.

All take logits of shape [N, V] (N = the compared token positions of one step) in float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def max_abs(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max())


def mean_abs(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).mean())


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Smallest per-position cosine similarity of the logit vectors."""
    a, b = ref.astype(np.float64), got.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float((ref.argmax(-1) == got.argmax(-1)).mean())


def kl_divergence(ref: np.ndarray, got: np.ndarray) -> float:
    """Largest per-position KL(ref || got) in nats."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    return float(np.max((np.exp(lp) * (lp - lq)).sum(-1)))


@dataclass(frozen=True)
class StepMetrics:
    """Error statistics of one step (a prefill chunk or a decode step)."""

    step: str
    positions: int
    max_abs: float
    mean_abs: float
    cosine: float
    top1: float
    kl: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def step_metrics(step: str, ref: np.ndarray, got: np.ndarray) -> StepMetrics:
    if ref.shape != got.shape:
        raise ValueError(f"step {step}: reference logits {ref.shape} vs target {got.shape}")
    if not np.isfinite(got).all():
        return StepMetrics(step, len(ref), float("inf"), float("inf"), -1.0, 0.0, float("inf"))
    return StepMetrics(step, len(ref), max_abs(ref, got), mean_abs(ref, got), cosine(ref, got),
                       top1_agreement(ref, got), kl_divergence(ref, got))
