"""ONNX Runtime target: parity past the window on a ragged batch, the graph really uses
GroupQueryAttention, the opset-23 fallback, int4/int8 exactness against their dequantized weights,
fp16 storage on CPU, and refusal of bad artifacts, unsupported pairs and misplaced positions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from pipeline.build import BuildRequest, build
from exporter.checkpoint import CheckpointFolder
from exporter.errors import ArtifactError, UserError
from targets import registry
from validation.gates import gates_for
from validation.parity import compare, default_case

from .conftest import canonical_runner, hf_model, save_checkpoint

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


# TINY_HF (window 4, 4/2 heads, vocab 96) with head_dim 16 (GQA's rotary kernel needs 16 | D) and 3
# layers, so every build here copies a translated layer (targets/onnxruntime/replicate.py).
MODEL = dict(seed=3, head_dim=16, num_hidden_layers=3)


@pytest.fixture(scope="module")
def model() -> Any:
    return hf_model(**MODEL)


@pytest.fixture(scope="module")
def checkpoint(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(model, tmp_path_factory.mktemp("ort") / "tiny-hf")


def _build(checkpoint: Path, out: Path, precision: str = "fp32", **options: object) -> Path:
    build(BuildRequest(target="onnxruntime", checkpoint=checkpoint, precision=precision, out=out,
                       options={k: str(v) for k, v in options.items()}))
    return out


@pytest.fixture(scope="module")
def fp32_artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(checkpoint, tmp_path_factory.mktemp("ort") / "fp32")


@pytest.fixture(scope="module")
def reference(model: Any) -> Any:
    """The canonical fp32 program with the checkpoint's weights: the independent reference."""
    return canonical_runner(model)


def _parity(model: Any, artifact: Path, precision: str, reference: Any) -> Any:
    _, runner = registry.load_runner(artifact)
    case = default_case(runner.capacity, runner.window, model.config.vocab_size)
    result = compare(reference, runner, case, gates_for(precision))
    print(f"{artifact.name}: lengths {case.describe()['prompt_lengths']}, worst {result.worst()}, "
          f"free-running {result.generation['free_running_match']}")
    return result


def _ops(artifact: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph.node]


def test_fp32_parity_past_window_ragged_batch(model: Any, fp32_artifact: Path, reference: Any) -> None:
    result = _parity(model, fp32_artifact, "fp32", reference)
    lengths = result.case.describe()["prompt_lengths"]
    assert len(lengths) == 2 and lengths[0] != lengths[1] and max(lengths) > 2 * model.config.sliding_window
    assert result.passed, [str(f) for f in result.failures]
    assert result.worst()["max_abs"] <= 1e-4
    assert result.generation["reference_tokens"] == result.generation["target_tokens"]


def test_rotary_tables_are_one_rounding_of_the_canonical_angles() -> None:
    """GQA's cos/sin tables: the canonical fp32 angles' cos/sin rounded once from float64, so no thread
    split or kernel choice enters (torch's threaded fp32 cos once gave a build rows off by 1.5e-4), and
    within one ulp of the canonical model's own fp32 cos/sin."""
    from exporter.config import preset
    from exporter.model import rope_angles
    from targets.onnxruntime.passes.rotary import cos_sin_tables

    cfg = preset("tiny")
    rows, half = 4096, cfg.head_dim // 2
    cos, sin = cos_sin_tables(cfg, rows, torch.float32)
    angles = rope_angles(torch.arange(rows)[None], cfg.head_dim, cfg.rope_theta)[0]
    assert cos.shape == sin.shape == (rows, half) and cos.dtype == np.float32
    np.testing.assert_array_equal(cos, np.cos(angles.double().numpy()).astype(np.float32))
    np.testing.assert_array_equal(sin, np.sin(angles.double().numpy()).astype(np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        np.testing.assert_array_max_ulp(cos, angles.cos().numpy(), maxulp=1)
        np.testing.assert_array_max_ulp(sin, angles.sin().numpy(), maxulp=1)
    finally:
        torch.set_num_threads(threads)


def test_cpu_fp32_graph_is_gqa_without_softmax_attention(model: Any, fp32_artifact: Path) -> None:
    ops = _ops(fp32_artifact)
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers
    assert not {"Softmax", "Attention", "ScatterElements", "ScatterND", "Transpose"} & set(ops), sorted(set(ops))
    graph = onnx.load(str(fp32_artifact / "model.onnx"), load_external_data=False).graph
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["local_window_size"] == model.config.sliding_window and attrs["sliding_window_cache"] == 1
    assert attrs["do_rotary"] == 1 and gqa.input[1] == gqa.input[2] == ""  # RoPE fused, packed q/k/v
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)


def test_onnx_attention_fallback_parity(model: Any, checkpoint: Path, reference: Any, tmp_path: Path) -> None:
    artifact = _build(checkpoint, tmp_path / "fallback", attention="onnx-attention")
    ops = _ops(artifact)
    assert ops.count("Attention") == model.config.num_hidden_layers and "GroupQueryAttention" not in ops
    result = _parity(model, artifact, "fp32", reference)
    assert result.passed and result.worst()["max_abs"] <= 1e-4


def _dequantized(artifact: Path, bits: int) -> dict[str, torch.Tensor]:
    """Canonical weights rebuilt from the artifact's MatMulNBits blocks (symmetric: zero point 2^(bits-1))."""
    m = onnx.load(str(artifact / "model.onnx"))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        packed, scales = init[node.input[1]], init[node.input[2]]
        n, k = attrs["N"], attrs["K"]
        q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1) if bits == 4 else packed.reshape(n, -1)
        blocks = q.reshape(n, scales.shape[1], -1).astype(np.float32) - 2 ** (bits - 1)
        weight = (blocks * scales[:, :, None]).reshape(n, -1)[:, :k]
        out[node.input[1].removesuffix(".MatMul.weight_B") + ".weight"] = torch.from_numpy(weight.copy())
    return out


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
def test_quantized_graph_equals_its_dequantized_weights(model: Any, checkpoint: Path, reference: Any,
                                                        tmp_path: Path, precision: str, bits: int) -> None:
    """MatMulNBits computes exactly the canonical model on the quantizer's dequantized weights
    (accuracy_level 0: fp32 activations), so the lowering adds no error beyond quantization."""
    artifact = _build(checkpoint, tmp_path / precision, precision, accuracy_level=0, pack_qkv=False)
    assert _ops(artifact).count("MatMulNBits") == 7 * model.config.num_hidden_layers + 1  # + lm_head
    weights = _dequantized(artifact, bits)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    assert set(weights) < set(state)
    dequantized = hf_model(**MODEL)
    dequantized.load_state_dict({**state, **weights})
    exact = _parity(model, artifact, "fp32", reference=canonical_runner(dequantized))
    assert exact.worst()["max_abs"] <= 1e-4
    vs_fp32 = _parity(model, artifact, precision, reference)
    gates = gates_for(precision)
    assert vs_fp32.worst()["kl"] <= gates["kl"] and vs_fp32.worst()["cosine"] >= gates["cosine"]


def test_lowering_leaves_the_traced_program_unchanged(model: Any, checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import targets.onnxruntime.lower as lower
    from exporter.checkpoint import CheckpointFolder
    from exporter.config import config_from_dict
    from exporter.trace import TraceSpec, traced
    from targets.base import LowerInput
    from targets.onnxruntime.target import OnnxRuntimeOptions, OnnxRuntimeTarget

    cfg = config_from_dict(model.config.to_dict())
    trace = traced(TraceSpec(cfg, cfg.sliding_window, torch.float32), use_cache=False)
    real, seen = lower.template, []

    def template(inp: LowerInput, attention: str) -> Any:  # the program lowering translates, as handed over
        source = real(inp, attention)
        seen.append((source.program, source.program.graph_module.code, dict(source.program.state_dict)))
        return source

    monkeypatch.setattr(lower, "template", template)
    OnnxRuntimeTarget().lower(LowerInput(trace, cfg, cfg.sliding_window, "int4", CheckpointFolder(checkpoint),
                                         "cpu", OnnxRuntimeOptions()), tmp_path)
    (program, code, weights), = seen
    assert len(program.state_dict) < len(trace.program.state_dict)  # the 2-layer template of 3 layers
    assert program.graph_module.code == code
    assert all(program.state_dict[k] is v and 0 in v.stride() for k, v in weights.items() if v.dim() > 1)


def test_bad_artifact_files_are_refused(fp32_artifact: Path, tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(fp32_artifact, tmp_path / name))

    corrupt = copy("corrupt")
    data = bytearray((corrupt / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx.data: sha256 differs"):
        registry.load_runner(corrupt)

    truncated = copy("truncated")
    with open(truncated / "model.onnx", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ArtifactError, match=r"model.onnx: 100 bytes, manifest says \d+ \(truncated\?\)"):
        registry.load_runner(truncated)

    swapped = copy("swapped")  # a well-formed file that is not the one the manifest hashed
    shutil.copy(swapped / "genai_config.json", swapped / "model.onnx.data")
    with pytest.raises(ArtifactError, match="model.onnx.data"):
        registry.load_runner(swapped)


def test_unsupported_pairs_fail_before_work(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not support precision 'bf16' on 'cpu'; supported: cpu: fp32, fp16, int8, int4"):
        _build(checkpoint, tmp_path / "bf16", "bf16")
    with pytest.raises(UserError, match="does not support device 'tpu'"):
        build(BuildRequest(target="onnxruntime", checkpoint=checkpoint, device="tpu", out=tmp_path / "tpu"))
    with pytest.raises(UserError, match="block_size=24 must be a power of two"):
        _build(checkpoint, tmp_path / "block", "int4", block_size=24)
    with pytest.raises(UserError, match="lm_head_bits=2 must be 0"):
        _build(checkpoint, tmp_path / "head", "int4", lm_head_bits=2)
    from targets.onnxruntime.kernels import choose

    with pytest.raises(UserError, match="GroupQueryAttention has no cuda kernel for fp32"):
        choose("cuda", "fp32", "gqa")
    assert not any((tmp_path / name).exists() for name in ("bf16", "block", "head"))


def test_lm_head_int8_under_int4_reads_back_and_keeps_its_gates(model: Any, checkpoint: Path, reference: Any,
                                                                 tmp_path: Path) -> None:
    artifact = _build(checkpoint, tmp_path / "head8", "int4", lm_head_bits=8)
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    bits = {n.input[1]: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("lm_head.MatMul.weight_B") == 8 and set(bits.values()) == {4}
    manifest, _ = registry.load_runner(artifact)
    source = CheckpointFolder(checkpoint)
    assert not registry.get("onnxruntime").readback(artifact, manifest, source).mismatches
    assert _parity(model, artifact, "int4", reference).passed


def test_runner_refuses_positions_that_skip_tokens(fp32_artifact: Path) -> None:
    _, runner = registry.load_runner(fp32_artifact)
    runner.reset(1)
    runner.step(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]))
    with pytest.raises(UserError, match="continue each row"):
        runner.step(np.array([[8]]), np.array([[4]]))
    with pytest.raises(UserError, match="right-padded"):
        runner.step(np.array([[8, 9]]), np.array([[-1, 3]]))


def test_fp16_on_cpu_with_rope_in_graph(model: Any, checkpoint: Path, reference: Any, tmp_path: Path) -> None:
    """cpu/fp16 stores fp16 weights and computes in fp32; RoPE kept in the graph in front of GQA
    (the form used when head_dim is not a multiple of 16)."""
    artifact = _build(checkpoint, tmp_path / "fp16", "fp16", fuse_rotary=False)
    ops = _ops(artifact)
    assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers and "Cos" in ops
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    weights = [t for t in graph.initializer if t.name.endswith("weight")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input if i.name.startswith("past"))
    result = _parity(model, artifact, "fp16", reference)
    assert result.passed, [str(f) for f in result.failures]


def test_an_artifact_whose_trained_positions_equal_its_window_validates_and_benches(calibration_tiny: Path,
                                                                                   tmp_path: Path) -> None:
    """max_position_embeddings == sliding_window (Mistral 7B v0.1: 4096 both): the fused RoPE table holds
    exactly the window, and validation and bench keep every position within it instead of crashing."""
    import json

    from .conftest import cli_build, cli_run

    folder = tmp_path / "ckpt"
    shutil.copytree(calibration_tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = config["sliding_window"]
    (folder / "config.json").write_text(json.dumps(config))
    held = config["sliding_window"]
    out = tmp_path / "art"
    result = cli_build("onnxruntime", out, "--checkpoint", str(folder))
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    case = rep["parity"]["fidelity"]["case"]
    assert rep["parity"]["status"] == "passed"
    assert max(case["prompt_lengths"]) + case["new_tokens"] <= held < 2 * held + 3  # shortened, still past C
    assert max(case["prompt_lengths"]) > held // 2
    bench = cli_run("bench", str(out), "--json")
    assert bench.exit_code == 0, bench.output
    lat = json.loads(bench.stdout)["latency"]
    steps = 2 + 8  # warmup + timed decode steps
    assert lat["positions_held"] == held and lat["decode"]
    assert all(r["fill"] + steps <= held for r in lat["decode"]) and all(r["tokens"] <= held for r in lat["prefill"])


def test_bench_options_are_clipped_to_what_the_artifact_serves_and_recorded(fp32_artifact: Path) -> None:
    import json

    from .conftest import cli_run, one_line_error

    manifest = json.loads((fp32_artifact / "manifest.json").read_text())
    capacity = manifest["cache"]["capacity"]
    result = cli_run("bench", str(fp32_artifact), "--prompt-lengths", f"3,{capacity * 10}", "--fills", "1,2",
                     "--repeats", "2", "--warmup", "1", "--batch", "2", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    lat = json.loads(result.stdout)["latency"]
    assert json.loads(result.stdout)["fingerprint"]["threads"] == 1  # the session ran on one thread
    assert [r["tokens"] for r in lat["prefill"]] == [3, capacity] and [r["fill"] for r in lat["decode"]] == [1, 2]
    assert lat["batch"] == 2 and all(r["runs"] == 2 for r in lat["prefill"])
    assert all(r["runs"] == 8 for r in lat["decode"])  # one sample per timed decode step
    assert lat["settings"] == {"prompt_lengths": [3, capacity * 10], "fills": [1, 2], "repeats": 2, "warmup": 1,
                               "decode_steps": 8, "batch": 2, "threads": 1}
    assert len(lat["notes"]) == 1 and f"measured at {capacity}" in lat["notes"][0]
    one_line_error(cli_run("bench", str(fp32_artifact), "--fills", "0"), "--fills takes positive token counts")
    one_line_error(cli_run("bench", str(fp32_artifact), "--prompt-lengths", "a,b"), "comma-separated integers")
    one_line_error(cli_run("bench", str(fp32_artifact), "--threads", "0"), "--threads")


def test_the_graph_names_no_local_path(fp32_artifact: Path) -> None:
    """The exporter's per-node stack traces carry absolute source paths: the same inputs must give the
    same bytes wherever the tool is installed (and ship no local path)."""
    import exporter

    root = str(Path(exporter.__file__).resolve().parent.parent).encode()
    data = (fp32_artifact / "model.onnx").read_bytes()
    assert root not in data and b"pkg.torch.onnx.stack_trace" not in data
    model = onnx.load(str(fp32_artifact / "model.onnx"), load_external_data=False)
    assert any(p.key == "namespace" for n in model.graph.node for p in n.metadata_props)  # the rest is kept
