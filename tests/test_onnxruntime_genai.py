"""onnxruntime-genai runs the artifact unchanged: og.Model/og.Generator greedy tokens equal ours for
a prompt longer than the sliding window (the tiny preset: window 16)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.build import BuildRequest, build
from targets.generate import greedy_generate
from targets import registry

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")


def genai_greedy(artifact: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_genai_greedy_tokens_equal_ours(tmp_path: Path) -> None:
    out = tmp_path / "tiny-ort"
    build(BuildRequest(target="onnxruntime", out=out))
    manifest, runner = registry.load_runner(out)
    window = manifest["cache"]["window"]
    prompt = [(7 * i + 3) % manifest["model"]["config"]["vocab_size"] for i in range(3 * window + 5)]
    theirs = genai_greedy(out, prompt, 12)
    ours = greedy_generate(runner, [prompt], 12)[0]
    print(f"prompt {len(prompt)} tokens (window {window}): genai {theirs}, ours {ours}")
    assert len(theirs) == 12 and theirs == ours
