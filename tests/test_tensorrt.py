"""TensorRT target: the engine-ready ONNX (checked in ONNX Runtime on every run), profiles, plan,
the honest no-TensorRT path; engine tests run only where tensorrt imports and a GPU exists."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from mistral_export.cli import app
from tests.conftest import cli_build
from targets import registry
from targets.tensorrt.plan import profiles, trtexec_command

cli = CliRunner()
TRT_REASON = registry.get("tensorrt").check_available()


def _build(out: Path, *args: str) -> object:
    return cli_build("tensorrt", out, *args)


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory: pytest.TempPathFactory, calibration_tiny: Path) -> Path:
    out = tmp_path_factory.mktemp("trt") / "fp16"
    assert _build(out, "--onnx-only", "--checkpoint", str(calibration_tiny)).exit_code == 0
    return out


def test_onnx_has_single_output_attention_and_no_softmax(onnx_artifact: Path) -> None:
    model = onnx.load(str(onnx_artifact / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2 and all(len([o for o in n.output if o]) == 1 for n in attention)
    assert "Softmax" not in ops and model.opset_import[0].version == 23
    # Standard ONNX only: TensorRT's parser takes no ONNX Runtime contrib ops (fused RMSNorm included).
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and "SimplifiedLayerNormalization" not in ops
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims["input_ids"] == ["batch", "chunk"] and dims["past_key.0"] == ["batch", 2, 16, 16]


def test_onnx_proxy_parity_is_labelled(onnx_artifact: Path) -> None:
    report = json.loads((onnx_artifact / "report.json").read_text())
    parity = report["parity"]
    print("tensorrt fp16 onnx-proxy worst:", parity["fidelity"]["worst"])
    assert parity["status"] == "passed" and parity["level"] == "onnx-proxy"
    assert "ONNX Runtime" in parity["measured_on"] and report["latency"]["level"] == "onnx-proxy"
    plan = json.loads((onnx_artifact / "engine_plan.json").read_text())
    assert [p["name"] for p in plan["profiles"]] == ["prefill", "decode"]
    assert (onnx_artifact / "build_engine.sh").read_text().count("--profile=") == 2


def test_profiles_and_trtexec_plan() -> None:
    prefill, decode = profiles(layers=2, kv_heads=2, head_dim=16, capacity=16, min_batch=1, opt_batch=2, max_batch=4)
    assert prefill.shapes["input_ids"].min == (1, 1) and prefill.shapes["input_ids"].opt == (2, 16)
    assert prefill.shapes["input_ids"].max == (4, 16)
    assert (decode.shapes["positions"].min, decode.shapes["positions"].opt, decode.shapes["positions"].max) == \
        ((1, 1), (2, 1), (4, 1))
    assert decode.shapes["past_value.1"].max == (4, 2, 16, 16)
    cmd = trtexec_command("model.onnx", "engine.plan", [prefill, decode], 4, "timing.cache")
    assert cmd[:4] == ["trtexec", "--onnx=model.onnx", "--saveEngine=engine.plan", "--stronglyTyped"]
    assert "--builderOptimizationLevel=4" in cmd and cmd[-1] == "--timingCacheFile=timing.cache"
    first = cmd.index("--profile=0")
    assert cmd[first + 1].startswith("--minShapes=input_ids:1x1,positions:1x1,past_key.0:1x2x16x16")
    assert cmd[cmd.index("--profile=1") + 2].startswith("--optShapes=input_ids:2x1,")


@pytest.mark.skipif(TRT_REASON is None, reason="tensorrt and a GPU are present here: the engine path runs instead")
def test_without_tensorrt_build_explains_and_writes_nothing(tmp_path: Path) -> None:
    result = _build(tmp_path / "x")
    assert result.exit_code == 2 and "--onnx-only" in result.output and "tensorrt is not importable" in result.output
    assert not list(tmp_path.iterdir())
    targets = json.loads(cli.invoke(app, ["targets", "--json"]).output)
    row = next(r for r in targets if r["name"] == "tensorrt")
    assert not row["available"] and "tensorrt" in row["reason"]


@pytest.mark.parametrize("option,needle", [("max_batch=0", "batch range"), ("optimization_level=9", "0..5")])
def test_bad_options(tmp_path: Path, option: str, needle: str) -> None:
    result = _build(tmp_path / "x", "--onnx-only", "--option", option, "--no-validate")
    assert result.exit_code == 2 and needle in result.output and not (tmp_path / "x").exists()


def test_bf16_onnx_is_written_but_not_reported_as_validated(tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert _build(out, "--onnx-only", "--precision", "bf16").exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["status"] == "not-run" and "bf16" in manifest["validation"]["reason"]
    result = cli.invoke(app, ["validate", str(out)])
    assert result.exit_code == 2 and "cannot run" in result.output


def test_onnx_only_is_refused_for_other_targets(tmp_path: Path) -> None:
    result = cli.invoke(app, ["build", "--target", "reference", "--onnx-only", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--onnx-only applies to --target tensorrt" in result.output


@pytest.mark.skipif(TRT_REASON is not None, reason=f"tensorrt engine: {TRT_REASON}")
def test_engine_build_and_parity(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    assert _build(out).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["engine_build"]["sm"] and (out / "engine.plan").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["status"] == "passed" and report["parity"]["level"] == "device"
