"""Layer replication (targets/onnxruntime/replicate.py): a graph whose layers 2..N-1 are copies of the
translated second layer is the graph translating all N layers gives, node for node and number for
number, and a graph that is not a two-layer template is refused rather than copied wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporter.config import config_from_dict
from exporter.trace import TraceSpec, trace
from pipeline.build import BuildRequest, build
from targets import registry
from targets.generate import greedy_generate, prefill

from .conftest import hf_model, save_checkpoint

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

LAYERS = 4


@pytest.fixture(scope="module")
def model() -> Any:
    return hf_model(seed=11, head_dim=16, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def artifacts(model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same checkpoint built twice: as the target builds it (two layers translated), and with every
    layer translated (the template hook answering with the whole program)."""
    import targets.onnxruntime.lower as lower

    base = tmp_path_factory.mktemp("replicate")
    checkpoint = save_checkpoint(model, base / "ckpt")
    out = {}
    for kind in ("replicated", "translated"):
        with pytest.MonkeyPatch.context() as mp:
            if kind == "translated":
                mp.setattr(lower, "template", lambda inp, attention: inp.trace)
            out[kind] = base / kind
            build(BuildRequest(target="onnxruntime", checkpoint=checkpoint, precision="int4", out=out[kind]))
    return out


def _target(artifact: Path) -> dict[str, Any]:
    return json.loads((artifact / "manifest.json").read_text())["target"]


def test_replicated_graph_has_the_translated_graphs_nodes_and_weights(artifacts: dict[str, Path]) -> None:
    replicated, translated = _target(artifacts["replicated"]), _target(artifacts["translated"])
    assert (replicated["translated_layers"], translated["translated_layers"]) == (2, LAYERS)
    assert replicated["graph_ops"] == translated["graph_ops"]
    assert replicated["graph_ops"]["com.microsoft::GroupQueryAttention"] == LAYERS
    assert replicated["weight_map"] == translated["weight_map"]
    data = [(artifacts[k] / "model.onnx.data").read_bytes() for k in ("replicated", "translated")]
    assert data[0] == data[1]  # same tensors, same order


def test_replicated_graph_computes_what_the_translated_one_does(model: Any, artifacts: dict[str, Path]) -> None:
    runners = [registry.load_runner(artifacts[k])[1] for k in ("replicated", "translated")]
    window = model.config.sliding_window
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, 3 * window).tolist(),
               rng.integers(3, model.config.vocab_size, window + 1).tolist()]  # ragged, past the window
    first, second = (prefill(r, prompts) for r in runners)
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(first[row, :len(prompt)], second[row, :len(prompt)])
    logits: list[list[np.ndarray]] = [[], []]
    tokens = [greedy_generate(r, prompts, 2 * window, logits=out) for r, out in zip(runners, logits)]
    assert tokens[0] == tokens[1]
    for a, b in zip(*logits):
        np.testing.assert_array_equal(a, b)


def _raw(layers: int) -> Any:
    """torch.onnx's raw graph (before the optimizer) of a tiny program of `layers` layers."""
    from exporter.attention import CACHED_ATTENTION_OP
    from targets.onnxruntime.export import OPSET, quiet
    from targets.onnxruntime.translate import gqa_translation

    cfg = dataclasses.replace(config_from_dict(hf_model(seed=11, head_dim=16).config.to_dict()),
                              num_hidden_layers=layers)
    with quiet():
        return torch.onnx.export(trace(TraceSpec(cfg, 8, torch.float32)), (), dynamo=True, optimize=False,
                                 custom_translation_table={CACHED_ATTENTION_OP: gqa_translation(cfg, 8)},
                                 opset_version=OPSET, verbose=False).model


def test_a_graph_that_is_not_a_two_layer_template_is_refused() -> None:
    from targets.onnxruntime.replicate import ReplicationError, replicate

    with pytest.raises(ReplicationError, match="two-layer template"):
        replicate(_raw(3).graph, 5, [])  # a third layer's nodes
    model = _raw(2)
    norm = [n for n in model.graph if "model.norm" in n.metadata_props.get("pkg.torch.onnx.name_scopes", "")][-1]
    layer_1 = next(n for n in model.graph if "'model.layers.1'" in n.metadata_props.get(
        "pkg.torch.onnx.name_scopes", "") and n.op_type == "MatMul")
    norm.replace_input_with(1, layer_1.outputs[0])  # the final norm reads a second value of layer 1
    with pytest.raises(ReplicationError, match="one value out of layer 1"):
        replicate(model.graph, 4, [])


def test_switchable_adapters_on_copied_layers_validate(model: Any, tmp_path: Path) -> None:
    """LoRA inputs are added after the copy (passes/lora.py): every layer's, copies included, must
    carry its adapter. The build validates each adapter against the reference with it merged."""
    pytest.importorskip("peft", reason="peft is not installed (test extra)")
    from tests.test_lora import make_adapter

    from .conftest import cli_build

    base = save_checkpoint(model, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", seed=7)
    result = cli_build("onnxruntime", tmp_path / "out", "--checkpoint", str(base), "--adapters", f"a={adapter}")
    assert result.exit_code == 0 and "validation: passed" in result.output, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert manifest["target"]["translated_layers"] == 2
    assert report["parity"]["adapters"]["a"]["status"] == "passed"
