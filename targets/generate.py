"""Chunked prefill and greedy decoding through any Runner (the target contract only).

Ragged batches are right-padded: padding tokens get position -1, so they neither see nor are seen,
and each row decodes at its own position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from exporter.errors import UserError
from targets.base import Runner, chunks

PAD_ID = 0
# Prefill steps of at most this many tokens when only the last logits are needed (generation, parity):
# a step's activations grow with its length (attention scores are B x heads x T x (C + T) floats:
# 8.6 GB in fp32 for Mistral 7B, batch 2, at T = C = 4096), its logits too (B x T x vocab).
PREFILL_STEP = 512


def pad_batch(rows: Sequence[Sequence[int]], starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """ids, positions [B, Tmax]: row b holds rows[b] at positions starts[b]...; padding is (PAD_ID, -1)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    pos = np.full((len(rows), width), -1, dtype=np.int64)
    for b, (row, start) in enumerate(zip(rows, starts)):
        ids[b, :len(row)] = row
        pos[b, :len(row)] = np.arange(start, start + len(row))
    return ids, pos


def prefill(runner: Runner, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Reset the runner and feed the prompts in chunks of at most its capacity.

    Returns the logits of every prompt position, [B, Tmax, V] (padding rows hold garbage)."""
    return np.concatenate([logits for _, _, logits in _prefill_steps(runner, prompts, runner.capacity)], axis=1)


def prefill_last(runner: Runner, prompts: Sequence[Sequence[int]], step: int = PREFILL_STEP) -> np.ndarray:
    """Reset the runner, feed the prompts in steps of at most `step` tokens (and its capacity) and
    return each row's logits at its last token, [B, V], without keeping the others."""
    lengths = [len(p) for p in prompts]
    last: np.ndarray | None = None
    for a, b, logits in _prefill_steps(runner, prompts, min(step, runner.capacity)):
        if last is None:
            last = np.zeros((len(prompts), logits.shape[-1]), dtype=logits.dtype)
        for row, n in enumerate(lengths):
            if a < n <= b:
                last[row] = logits[row, n - 1 - a]
    assert last is not None
    return last


def _prefill_steps(runner: Runner, prompts: Sequence[Sequence[int]],
                   step: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Reset the runner and feed the right-padded prompts in spans of `step`: (start, end, logits)."""
    if any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    check_context(runner, max(len(p) for p in prompts))
    runner.reset(len(prompts))
    ids, pos = pad_batch(prompts, [0] * len(prompts))
    for a, b in chunks(ids.shape[1], step):
        yield a, b, runner.step(ids[:, a:b], pos[:, a:b])


def check_context(runner: Runner, total: int) -> None:
    """Without a window the cache holds at most `capacity` tokens; more would silently slide."""
    if runner.window is None and total > runner.capacity:
        raise UserError(f"sequence of {total} tokens exceeds the artifact's context of {runner.capacity}; "
                        "rebuild with a larger --max-context")


def greedy_generate(runner: Runner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_token_id: int | None = None, logits: list[np.ndarray] | None = None,
                    on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy decoding; returns only the new tokens of each row (stopping a row at EOS). `logits`, if
    given, receives each step's [batch, vocab] logits, those the new token i was chosen from;
    `on_token(row, token)` is called as each token is chosen, for streaming."""
    lengths = [len(p) for p in prompts]
    check_context(runner, max(lengths) + max_new_tokens - 1)
    last = prefill_last(runner, prompts)
    nxt = last.argmax(-1)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for i in range(max_new_tokens):
        if logits is not None:
            logits.append(last)
        for b, token in enumerate(nxt):
            if not done[b]:
                out[b].append(int(token))
                if on_token is not None:
                    on_token(b, int(token))
                done[b] = eos_token_id is not None and int(token) == eos_token_id
        if all(done) or i == max_new_tokens - 1:
            break
        ids = nxt.reshape(-1, 1).astype(np.int64)
        pos = np.array([[n + i] for n in lengths], dtype=np.int64)
        last = runner.step(ids, pos)[:, 0]
        nxt = last.argmax(-1)
    return out
