"""The exported program: equals eager, chunking is invisible, shapes stay dynamic, trace is cached."""

from __future__ import annotations

import numpy as np
import torch

from exporter.config import config_from_dict
from targets.generate import pad_batch
from exporter.model import MistralModel, empty_caches
from exporter.trace import TraceSpec, traced
from tests.conftest import canonical_runner, hf_model


def test_program_with_fake_trace_equals_eager() -> None:
    """Traced on FakeTensors, bound by name afterwards: same logits and caches as the eager module."""
    model = hf_model()
    cfg = config_from_dict(model.config.to_dict())
    eager = MistralModel(cfg).eval()
    eager.load_state_dict(model.state_dict())
    runner = canonical_runner(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2], [0, 1, -1]])
    k, v = empty_caches(cfg, 2, runner.capacity, torch.float32)
    with torch.no_grad():
        ref, ref_k, _ = eager(ids, pos, k, v)
    runner.reset(2)
    got = runner.step(ids.numpy(), pos.numpy())
    err = float(np.abs(got - ref.numpy()).max())
    cache_err = float((runner.k[0] - ref_k[0]).abs().max())
    print(f"exported vs eager: logits {err:.2e}, cache {cache_err:.2e}")
    assert err <= 1e-5 and cache_err <= 1e-5


def test_chunked_prefill_equals_one_shot() -> None:
    model = hf_model(sliding_window=None)
    runner = canonical_runner(model, capacity=32)
    ids, pos = pad_batch([list(range(1, 31)), list(range(40, 52))], [0, 0])
    runner.reset(2)
    whole = runner.step(ids, pos)
    for size in (1, 7, 16):
        runner.reset(2)
        parts = np.concatenate([runner.step(ids[:, a:a + size], pos[:, a:a + size])
                                for a in range(0, ids.shape[1], size)], axis=1)
        err = float(np.abs(np.where(pos[..., None] >= 0, parts - whole, 0)).max())
        print(f"chunks of {size} vs one shot: {err:.2e}")
        assert err <= 1e-5


def test_dynamic_batch_and_chunk_one() -> None:
    """B = 1, T = 1 runs although the example used B = T = 2 (no specialisation)."""
    runner = canonical_runner(hf_model())
    runner.reset(1)
    assert runner.step(np.array([[5]]), np.array([[0]])).shape == (1, 1, 96)
    runner.reset(3)
    assert runner.step(np.zeros((3, 4), np.int64), np.tile(np.arange(4), (3, 1))).shape == (3, 4, 96)


def test_trace_cache_hit_and_key(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MISTRAL_EXPORT_CACHE", str(tmp_path))
    cfg = config_from_dict(hf_model().config.to_dict())
    spec = TraceSpec(cfg, 4, torch.float32)
    first = traced(spec)
    second = traced(spec)
    print(f"trace {first.seconds:.2f}s, cached load {second.seconds:.2f}s")
    assert not first.cache_hit and second.cache_hit
    assert TraceSpec(cfg, 8, torch.float32).key() != spec.key()
    assert TraceSpec(cfg, 4, torch.bfloat16).key() != spec.key()


def test_program_keeps_one_attention_node_per_layer() -> None:
    program = traced(TraceSpec(config_from_dict(hf_model().config.to_dict()), 4, torch.float32)).program
    nodes = [n for n in program.graph.nodes if "cached_attention" in str(n.target)]
    assert len(nodes) == 2
