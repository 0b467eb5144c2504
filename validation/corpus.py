"""Distribution statistics over a real-text corpus, as llama.cpp's `perplexity --kl-divergence`
reports them: mean KL(reference || artifact) with its uncertainty, KL percentiles, the share of
positions where both pick the same top token, the change in probability of the reference's top
token (delta p), and both perplexities.

The corpus (validation/data/corpus.txt, written for this project: prose in nine languages, code,
SQL, JSON and numbers, about 4 KB) is tokenized with the artifact's tokenizer where it has one, else
mapped byte by byte onto token ids. It runs in rows of 2C + 3 tokens, prefilled in chunks, so every
row crosses the sliding window and the chunk boundaries; each position's next token is scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import numpy as np

from targets.base import Runner, chunks
from targets.generate import PREFILL_STEP, pad_batch

BATCH = 4  # rows per step


def text() -> str:
    return (files("validation") / "data" / "corpus.txt").read_text(encoding="utf-8")


def tokens(tokenizer: Any, vocab: int) -> tuple[list[int], str]:
    """The corpus as ids, and how they were made."""
    if tokenizer is not None:
        return list(tokenizer.encode(text(), add_special_tokens=False)), "tokenizer"
    return [1 + b % (vocab - 1) for b in text().encode("utf-8")], "utf-8 bytes"


def rows(ids: Sequence[int], capacity: int, window: int | None, held: int | None = None) -> list[list[int]]:
    """Consecutive rows of 2C + 3 tokens (with a window; else the whole context) covering the corpus,
    which is repeated where one row is longer than it."""
    length = 2 * capacity + 3 if window else capacity
    length = min(length, held) if held is not None else length  # positions the artifact serves
    count = max(1, math.ceil(len(ids) / length))
    stream = list(ids) * math.ceil(count * length / len(ids))
    return [stream[i * length:(i + 1) * length] for i in range(count)]


@dataclass
class Positions:
    """Per scored position: KL, same top token, the reference top token's probability under both, and
    the log-likelihood of the true next token under both."""

    kl: list[float] = field(default_factory=list)
    same_top: list[bool] = field(default_factory=list)
    p_ref: list[float] = field(default_factory=list)
    p_art: list[float] = field(default_factory=list)
    nll_ref: list[float] = field(default_factory=list)
    nll_art: list[float] = field(default_factory=list)

    def add(self, ref: np.ndarray, art: np.ndarray, nxt: np.ndarray) -> None:
        """ref, art: [N, V] logits; nxt: [N] next-token ids."""
        lp, lq = _log_softmax(ref), _log_softmax(art)
        top = lp.argmax(-1)
        rows_ = np.arange(len(nxt))
        self.kl += (np.exp(lp) * (lp - lq)).sum(-1).tolist()
        self.same_top += (top == lq.argmax(-1)).tolist()
        self.p_ref += np.exp(lp[rows_, top]).tolist()
        self.p_art += np.exp(lq[rows_, top]).tolist()
        self.nll_ref += (-lp[rows_, nxt]).tolist()
        self.nll_art += (-lq[rows_, nxt]).tolist()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def summarize(pos: Positions) -> dict[str, Any]:
    """llama.cpp's KL-divergence summary: means with standard errors, percentiles, perplexities."""
    kl = np.maximum(np.array(pos.kl), 0.0)  # rounding can make an exact match a hair negative
    n = len(kl)
    same = np.array(pos.same_top, dtype=np.float64)
    dp = np.array(pos.p_art) - np.array(pos.p_ref)
    nll_ref, nll_art = np.array(pos.nll_ref), np.array(pos.nll_art)
    ln_ratio = nll_art - nll_ref
    return {
        "positions": n,
        "mean_kl": float(kl.mean()), "mean_kl_stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kl_percentiles": {name: float(np.percentile(kl, q)) for name, q in
                           (("max", 100), ("p99.9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("median", 50))},
        "same_top_pct": float(100 * same.mean()),
        "same_top_pct_stderr": float(100 * math.sqrt(same.mean() * (1 - same.mean()) / n)),
        "delta_p_pct": {"mean": float(100 * dp.mean()), "rms": float(100 * math.sqrt((dp ** 2).mean())),
                        "p1": float(100 * np.percentile(dp, 1)), "p99": float(100 * np.percentile(dp, 99))},
        "ppl_reference": float(math.exp(nll_ref.mean())), "ppl_artifact": float(math.exp(nll_art.mean())),
        "ppl_ratio": float(math.exp(ln_ratio.mean())),
        "ln_ppl_ratio_stderr": float(ln_ratio.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kl_quantiles": [float(v) for v in np.percentile(kl, np.arange(101))],  # the CDF parity.png draws
    }


def run(target: Runner, references: dict[str, Runner], corpus_rows: list[list[int]], chunk: int,
        progress: Callable[[str, float], None] = lambda m, f: None) -> dict[str, Positions]:
    """Feed the rows to the target and every reference in lockstep; per reference, the positions."""
    step = min(chunk, PREFILL_STEP)
    out = {name: Positions() for name in references}
    batches = [corpus_rows[i:i + BATCH] for i in range(0, len(corpus_rows), BATCH)]
    for done, batch in enumerate(batches):
        lengths = [len(r) for r in batch]
        ids, pos = pad_batch(batch, [0] * len(batch))
        nxt = np.full_like(ids, -1)
        nxt[:, :-1] = ids[:, 1:]
        for runner in (target, *references.values()):
            runner.reset(len(batch))
        for a, b in chunks(ids.shape[1], step):
            got = target.step(ids[:, a:b], pos[:, a:b])
            scored = (pos[:, a:b] >= 0) & (np.arange(a, b)[None, :] < np.array(lengths)[:, None] - 1)
            for name, ref in references.items():
                want = ref.step(ids[:, a:b], pos[:, a:b])
                out[name].add(want[scored], got[scored], nxt[:, a:b][scored])
        progress(f"corpus {done + 1}/{len(batches)}", (done + 1) / len(batches))
    return out
