"""Parity of a target runner against the reference runner, driven only through the Runner contract.

Both runners see the same deterministic batch: two rows of different lengths that cross the sliding
window and the prefill-chunk boundaries. Each step (every prefill chunk, then every decode step) is
compared; decoding is teacher-forced with the reference's greedy tokens, and then both runners
generate freely for the token-match rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from targets.generate import PREFILL_STEP, greedy_generate, pad_batch
from targets.base import Runner, chunks
from validation.gates import GateFailureItem, evaluate
from validation.metrics import StepMetrics, step_metrics

# Real text for artifacts with a tokenizer: mixed prose, code and numbers.
SAMPLE_TEXT = (
    "The Mistral 7B model uses grouped-query attention and a sliding window of 4096 tokens, so each layer "
    "attends to a bounded span while information still travels further through depth. def rolling(p, c): "
    "return p % c  # the cache slot of position p. In 1889 the tower was 312 metres tall; today, with its "
    "antennas, it stands at 330 m. Le vent se leve, il faut tenter de vivre. "
)


@dataclass(frozen=True)
class ParityCase:
    """The compared inputs: prompts (ragged batch), new tokens to decode, and the prefill chunk."""

    prompts: list[list[int]]
    new_tokens: int
    chunk: int
    source: str

    def describe(self) -> dict[str, Any]:
        return {"prompt_lengths": [len(p) for p in self.prompts], "new_tokens": self.new_tokens,
                "chunk": self.chunk, "source": self.source}


def positions_held(runner: Any) -> int | None:
    """The positions an artifact can serve at most (an ONNX Runtime fused RoPE table holds
    max_position_embeddings), or None when only the cache rules bound them."""
    return getattr(runner, "max_positions", None)


def prompt_lengths(capacity: int, window: int | None, new_tokens: int, held: int | None = None) -> list[int]:
    """With a window: 2C + 3 and C + 1 tokens (crossing the window and two chunk edges), shortened
    to the positions the artifact holds. Without: the context bounds everything, so the rows fill
    most of it and half of it."""
    if window:
        lengths = [2 * capacity + 3, capacity + 1]
        if held is not None:
            if held - new_tokens < 2:
                raise ValueError(f"the artifact holds {held} positions, too few to validate {new_tokens} new tokens")
            first, second = (min(n, held - new_tokens) for n in lengths)
            lengths = [first, second if second < first else first // 2 + 1]  # still a ragged batch
        return lengths
    longest = capacity - new_tokens
    if longest < 2:
        raise ValueError(f"context {capacity} is too small to validate {new_tokens} new tokens")
    return [longest, max(1, longest // 2 + 1)]


def default_case(capacity: int, window: int | None, vocab: int, tokenizer: Any = None,
                 new_tokens: int = 20, lengths: Sequence[int] | None = None, held: int | None = None) -> ParityCase:
    if held is not None and not lengths:
        new_tokens = min(new_tokens, max(1, held // 4))  # a short table leaves room for prompts too
    lengths = list(lengths or prompt_lengths(capacity, window, new_tokens, held))
    # Prefill chunks of C (the longest a target takes) up to PREFILL_STEP tokens, which bounds the
    # reference's activations and each step's logits at scale; rows still cross the window.
    step = min(capacity, PREFILL_STEP)
    if tokenizer is not None:
        ids: list[int] = []
        while len(ids) < max(lengths) + 1:
            ids += tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)
        prompts = [ids[i:i + n] for i, n in enumerate(lengths)]
        return ParityCase(prompts, new_tokens, step, "text")
    rng = np.random.default_rng(1234)
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    return ParityCase(prompts, new_tokens, step, "token-ids")


@dataclass
class ParityResult:
    """Every step's metrics, the generation rates and every gate failure."""

    case: ParityCase
    steps: list[StepMetrics]
    generation: dict[str, Any]
    gates: dict[str, float]
    failures: list[GateFailureItem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst(self) -> dict[str, float]:
        return {"max_abs": max(s.max_abs for s in self.steps), "mean_abs": max(s.mean_abs for s in self.steps),
                "kl": max(s.kl for s in self.steps), "cosine": min(s.cosine for s in self.steps),
                "top1": sum(s.top1 * s.positions for s in self.steps) / sum(s.positions for s in self.steps),
                "top1_worst_step": min(s.top1 for s in self.steps)}


def _prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(reference: Runner, target: Runner, case: ParityCase, gates: dict[str, float],
            progress: Callable[[str, float], None] = lambda m, f: None) -> ParityResult:
    """Run both runners in lockstep over the case and gate every step."""
    batch = len(case.prompts)
    lengths = [len(p) for p in case.prompts]
    ids, pos = pad_batch(case.prompts, [0] * batch)
    spans = list(chunks(ids.shape[1], case.chunk))
    total = len(spans) + case.new_tokens + 1
    steps: list[StepMetrics] = []
    reference.reset(batch)
    target.reset(batch)
    last_ref = np.zeros((batch, 0))
    last_tgt = np.zeros((batch, 0))
    for i, (a, b) in enumerate(spans):
        r = reference.step(ids[:, a:b], pos[:, a:b])
        g = target.step(ids[:, a:b], pos[:, a:b])
        valid = pos[:, a:b] >= 0
        steps.append(step_metrics(f"prefill[{a}:{b}]", r[valid], g[valid]))
        if i == 0:
            last_ref, last_tgt = np.zeros((batch, r.shape[-1])), np.zeros((batch, r.shape[-1]))
        for row in range(batch):
            if a < lengths[row] <= b:
                last_ref[row], last_tgt[row] = r[row, lengths[row] - 1 - a], g[row, lengths[row] - 1 - a]
        progress(f"parity prefill {b}/{ids.shape[1]}", (i + 1) / total)
    agree = []
    for j in range(case.new_tokens):
        tokens = last_ref.argmax(-1)
        agree.append(tokens == last_tgt.argmax(-1))
        step_pos = np.array([[n + j] for n in lengths], dtype=np.int64)
        step_ids = tokens.reshape(-1, 1).astype(np.int64)
        r, g = reference.step(step_ids, step_pos), target.step(step_ids, step_pos)
        steps.append(step_metrics(f"decode[{j}]", r[:, 0], g[:, 0]))
        last_ref, last_tgt = r[:, 0], g[:, 0]
        progress(f"parity decode {j + 1}/{case.new_tokens}", (len(spans) + j + 1) / total)
    ref_logits: list[np.ndarray] = []
    ref_free = greedy_generate(reference, case.prompts, case.new_tokens, logits=ref_logits)
    tgt_free = greedy_generate(target, case.prompts, case.new_tokens)
    progress("parity free-running", 1.0)
    matched = [_prefix_match(a, b) for a, b in zip(ref_free, tgt_free)]
    # Where the two first differ, the reference's own margin between its token and the artifact's. Within
    # the row's per-logit tolerance (each logit may be off by max_abs) the flip is a near tie that the
    # gate already admits: that row counts as matched, and the margin is reported.
    margins = [float(ref_logits[m][b, ref_free[b][m]] - ref_logits[m][b, tgt_free[b][m]])
               if m < min(len(ref_free[b]), len(tgt_free[b])) else None for b, m in enumerate(matched)]
    tie = 2 * gates.get("max_abs", 0.0)
    counted = [case.new_tokens if g is not None and g <= tie else m for m, g in zip(matched, margins)]
    generation = {
        "teacher_forced_match": float(np.mean(agree)) if agree else 1.0,
        "free_running_match": float(np.mean(counted) / case.new_tokens) if case.new_tokens else 1.0,
        "first_divergence": [m if m < case.new_tokens else None for m in matched],
        "divergence_margin": margins, "near_tie_logit_margin": tie,
        "reference_tokens": ref_free, "target_tokens": tgt_free,
    }
    return ParityResult(case, steps, generation, gates, evaluate(steps, generation, gates))
