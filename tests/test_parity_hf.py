"""The invariant: prefill == step-by-step decode == transformers, past the window, batch 2 ragged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from targets.generate import prefill
from tests.conftest import TOL, canonical_runner, hf_logits, hf_model
from tests.conftest import check_against_transformers as _check
from tests.conftest import random_ids as _ids

def test_prefill_and_decode_past_window() -> None:
    model = hf_model(sliding_window=4)
    runner = canonical_runner(model)
    prompt = _ids(36, 96, 1)
    _check(model, runner, [prompt], [7], "window 4, prefill 7 + decode 29")


def test_batch2_ragged_past_window() -> None:
    model = hf_model(sliding_window=4)
    runner = canonical_runner(model)
    prompts = [_ids(33, 96, 2), _ids(21, 96, 3)]
    _check(model, runner, prompts, [10, 3], "batch 2 ragged (33/21 tokens, prefill 10/3)")


def test_v03_style_no_window_rope_parameters() -> None:
    model = hf_model(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    runner = canonical_runner(model, capacity=48)
    prompts = [_ids(40, 96, 4), _ids(25, 96, 5)]
    _check(model, runner, prompts, [17, 9], "no window, rope_theta 1e6")


@pytest.mark.parametrize("overrides,label", [
    (dict(head_dim=16), "explicit head_dim 16 != 32/4"),
    (dict(num_key_value_heads=1), "MQA (1 kv head)"),
    (dict(tie_word_embeddings=True), "tied embeddings"),
])
def test_config_variants(overrides: dict, label: str) -> None:
    model = hf_model(**overrides)
    runner = canonical_runner(model)
    _check(model, runner, [_ids(30, 96, 6)], [5], label)


def test_prefill_chunk_at_full_capacity() -> None:
    """A chunk of exactly C tokens, twice over, wraps the ring in one step."""
    model = hf_model(sliding_window=8)
    runner = canonical_runner(model)
    prompt = _ids(24, 96, 7)
    _check(model, runner, [prompt], [16], "chunks of C=8")


def test_prefill_last_in_short_steps_equals_transformers() -> None:
    """Generation and parity prefill in steps shorter than the capacity and keep only each row's last
    logits: those equal transformers' at each row's last token, past the window, batch 2 ragged."""
    from targets.generate import prefill_last

    model = hf_model()
    runner = canonical_runner(model)
    vocab = model.config.vocab_size
    prompts = [_ids(2 * runner.capacity + 3, vocab, 1), _ids(runner.capacity + 1, vocab, 2)]
    last = prefill_last(runner, prompts, step=5)
    for b, p in enumerate(prompts):
        expected = hf_logits(model, p)[-1].numpy()
        assert np.abs(last[b] - expected).max() <= TOL


def test_empty_prompt_is_refused() -> None:
    from exporter.errors import UserError
    from targets.generate import greedy_generate, prefill_last

    runner = canonical_runner(hf_model())
    for call in (lambda: prefill(runner, [[1, 2], []]), lambda: prefill_last(runner, [[]]),
                 lambda: greedy_generate(runner, [[3], []], 2)):
        with pytest.raises(UserError, match="at least one token"):
            call()
