"""Parity of a target runner against the reference runner, driven only through the Runner contract.

Both runners see the same deterministic batch: two rows of different lengths that cross the sliding
window and the prefill-chunk boundaries. Each step (every prefill chunk, then every decode step) is
compared; decoding is teacher-forced with the reference's greedy tokens, and then both runners
generate freely for the token-match rate.

Then one row reaches far positions (the model's max_position_embeddings, at most REACH, within what the
artifact holds): prefilled chunk by chunk and ended by a few decode steps, it is gated at the chunks
holding positions 2^k - 1 and at its end, so the gates see as many steps as they were calibrated on.
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


# Positions the reach row covers at most. Arithmetic that depends on the position in a low precision
# (fp16 rotary angles: spacing 0.5 at 1000, 2 past 2048, where positions stop being exact) passes the
# gates at the first few dozen positions and drifts past them within a few hundred: measured on the
# tiny preset with the angles in fp16, max_abs 0.05 at position 500 and 1.0 at 4000 (fp16 gate 0.02).
REACH = 4096
REACH_DECODE = 3  # decode steps that end the reach row (a target's decode path may be its own function)


@dataclass(frozen=True)
class ParityCase:
    """The compared inputs: prompts (ragged batch), new tokens to decode, the prefill chunk, and the
    reach row (0: none, where the batch already covers every position the artifact serves)."""

    prompts: list[list[int]]
    new_tokens: int
    chunk: int
    source: str
    reach: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"prompt_lengths": [len(p) for p in self.prompts], "new_tokens": self.new_tokens,
                "chunk": self.chunk, "source": self.source, "reach": len(self.reach),
                "positions": max(len(self.reach), max(len(p) for p in self.prompts) + self.new_tokens)}


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


def reach_length(capacity: int, window: int | None, covered: int, positions: int, held: int | None) -> int:
    """Tokens of the reach row: up to `positions` (the model's own, at most REACH) and what the artifact
    holds; 0 without a window (the context bounds the positions, and the batch fills it) or where the
    batch already covers them."""
    if not window:
        return 0
    reach = min(positions, REACH, held if held is not None else positions)
    return reach if reach > covered else 0


def default_case(capacity: int, window: int | None, vocab: int, tokenizer: Any = None,
                 new_tokens: int = 20, lengths: Sequence[int] | None = None, held: int | None = None,
                 positions: int = 0) -> ParityCase:
    """The validation batch, and a reach row up to `positions` (the model's max_position_embeddings)."""
    if held is not None and not lengths:
        new_tokens = min(new_tokens, max(1, held // 4))  # a short table leaves room for prompts too
    lengths = list(lengths or prompt_lengths(capacity, window, new_tokens, held))
    reach = reach_length(capacity, window, max(lengths) + new_tokens, positions, held)
    # Prefill chunks of C (the longest a target takes) up to PREFILL_STEP tokens, which bounds the
    # reference's activations and each step's logits at scale; rows still cross the window.
    step = min(capacity, PREFILL_STEP)
    if tokenizer is not None:
        ids: list[int] = []
        while len(ids) < max(max(lengths) + 1, reach):
            ids += tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)
        prompts = [ids[i:i + n] for i, n in enumerate(lengths)]
        return ParityCase(prompts, new_tokens, step, "text", ids[:reach])
    rng = np.random.default_rng(1234)
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    return ParityCase(prompts, new_tokens, step, "token-ids", rng.integers(0, vocab, reach).tolist())


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


def _reach_steps(reference: Runner, target: Runner, case: ParityCase,
                 progress: Callable[[str, float], None]) -> list[StepMetrics]:
    """The reach row (batch 1): its prompt prefilled in chunks, then REACH_DECODE decode steps fed the
    reference's greedy tokens; the metrics of the chunks holding positions 2^k - 1 past the batch's
    positions, of the last chunk and of every decode step."""
    if not case.reach:
        return []
    prompt = case.reach[:len(case.reach) - REACH_DECODE]
    ids = np.asarray([prompt], dtype=np.int64)
    reference.reset(1)
    target.reset(1)
    gated = {(1 << k) - 1 for k in range(len(case.reach).bit_length() + 1)
             if (1 << k) - 1 >= max(len(p) for p in case.prompts)} | {len(prompt) - 1}
    steps, last = [], np.zeros(0)
    spans = list(chunks(len(prompt), case.chunk))
    for i, (a, b) in enumerate(spans):
        pos = np.arange(a, b, dtype=np.int64)[None]
        r, g = reference.step(ids[:, a:b], pos), target.step(ids[:, a:b], pos)
        if any(a <= p < b for p in gated):
            steps.append(step_metrics(f"reach[{a}:{b}]", r[0], g[0]))
        last = r[0, -1]
        progress(f"parity reach {b}/{len(case.reach)}", (i + 1) / (len(spans) + REACH_DECODE))
    for j in range(REACH_DECODE):
        p = len(prompt) + j
        token = np.asarray([[int(last.argmax())]], dtype=np.int64)
        r, g = reference.step(token, np.asarray([[p]])), target.step(token, np.asarray([[p]]))
        steps.append(step_metrics(f"reach decode@{p}", r[:, 0], g[:, 0]))
        last = r[0, 0]
    return steps


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
    steps += _reach_steps(reference, target, case, progress)
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
