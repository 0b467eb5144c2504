"""Shared fixtures: tiny seeded checkpoints made in-process, and transformers as the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporter.config import config_from_dict
from exporter.trace import TraceSpec, bind, trace
from targets.generate import pad_batch, prefill
from targets.reference import ProgramRunner

TINY_HF: dict[str, Any] = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                               max_position_embeddings=256, rms_norm_eps=1e-5)


def hf_model(seed: int = 0, **overrides: Any) -> Any:
    """A seeded random transformers MistralForCausalLM (eager attention, fp32)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(**{**TINY_HF, **overrides})
    cfg._attn_implementation = "eager"
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a skipped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def save_checkpoint(model: Any, folder: Path, shard_size: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def canonical_runner(model: Any, capacity: int | None = None, dtype: torch.dtype = torch.float32) -> ProgramRunner:
    """The exported canonical program with the HF model's weights bound."""
    cfg = config_from_dict(model.config.to_dict())
    capacity = capacity or cfg.sliding_window or 64
    program = trace(TraceSpec(cfg, capacity, dtype))
    state = model.state_dict()
    bind(program, lambda name: state[name].to(dtype))
    return ProgramRunner(program, capacity, cfg.sliding_window)


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test session gets its own trace cache, so tests never see a stale program."""
    monkeypatch.setenv("MISTRAL_EXPORT_CACHE", str(tmp_path_factory.getbasetemp() / "trace-cache"))


@pytest.fixture
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of this test's own, with the CLI's logging (cache warnings are printed lines)."""
    from mistral_export.cli import configure_logging

    configure_logging()
    root = tmp_path / "cache"
    monkeypatch.setenv("MISTRAL_EXPORT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def calibration_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model the gates were calibrated on (benchmarks/gate_calibration.py CALIBRATION_TINY): the tiny
    preset's dimensions and weights with 512 ids and no tokenizer. The numeric suites build it; the
    default preset, with its real 32000-id tokenizer, is built by the text and CLI tests."""
    from benchmarks.gate_calibration import calibration_checkpoint

    return calibration_checkpoint(tmp_path_factory.mktemp("calibration") / "tiny-512")


def write_config(folder: Path, raw: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tiny word-level tokenizer, saved the way HF folders carry one."""
    from benchmarks.make_checkpoint import write_tokenizer

    write_tokenizer(folder, vocab_size)


def cli_run(*args: str) -> Any:
    """`mistral-export ARGS` through the CLI in-process, its output printed for the log."""
    from typer.testing import CliRunner

    from mistral_export.cli import app

    result = CliRunner().invoke(app, list(args))
    print(result.output)
    return result


def one_line_error(result: Any, needle: str) -> None:
    """Exit 2 and exactly one plain line, `error: ...`, that contains needle; no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in result.output


def cli_build(target: str, out: Path, *args: str) -> Any:
    """`mistral-export build --target target --out out ...` through the CLI, its output printed for the log."""
    return cli_run("build", "--target", target, "--out", str(out), *args)


TOL = 1e-4  # fp32 logits of the canonical graph against transformers


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_then_decode(runner: Any, prompts: list[list[int]], prefix: list[int]) -> np.ndarray:
    """Prefill prefix[b] tokens of each row (chunked), then feed the rest one token at a time."""
    first = prefill(runner, [p[:n] for p, n in zip(prompts, prefix)])
    steps = [first]
    for i in range(max(len(p) - n for p, n in zip(prompts, prefix))):
        rows = [p[n + i:n + i + 1] or [0] for p, n in zip(prompts, prefix)]
        ids, pos = pad_batch(rows, [n + i for n in prefix])
        pos[[b for b, (p, n) in enumerate(zip(prompts, prefix)) if n + i >= len(p)]] = -1
        steps.append(runner.step(ids, pos))
    # Reassemble each row's logits in position order.
    width = max(len(p) for p in prompts)
    out = np.zeros((len(prompts), width, steps[0].shape[-1]), dtype=np.float32)
    for b, (p, n) in enumerate(zip(prompts, prefix)):
        out[b, :n] = first[b, :n]
        for i in range(len(p) - n):
            out[b, n + i] = steps[1 + i][b, 0]
    return out


def check_against_transformers(model: Any, runner: Any, prompts: list[list[int]], prefix: list[int], label: str) -> float:
    ours = prefill_then_decode(runner, prompts, prefix)
    worst = 0.0
    for b, p in enumerate(prompts):
        ref = hf_logits(model, p).numpy()
        worst = max(worst, float(np.abs(ours[b, :len(p)] - ref).max()))
    print(f"{label}: max abs logit error vs transformers = {worst:.3e}")
    assert worst <= TOL
    return worst
