"""The black-box suite every target passes: build the tiny model the gates were calibrated on (the tiny
preset's weights, 512 ids: conftest.calibration_tiny), validate it through the Runner
contract against the canonical fp32 reference (past the window, batch 2 ragged, and one row up to
position 4095), generate.

A target is added here with the precisions it supports; where its runtime is missing the case
skips with the target's own one-line reason, never passes silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mistral_export.cli import app
from tests.conftest import cli_build
from targets import registry

cli = CliRunner()

def _tensorrt_args() -> list[str]:
    """The engine where TensorRT and a GPU exist, else the engine-ready ONNX (level onnx-proxy)."""
    return [] if registry.get("tensorrt").check_available() is None else ["--onnx-only"]


CASES = [
    ("reference", "fp32", []),
    ("reference", "bf16", []),
    ("coreml", "fp16", []),
    ("coreml", "int8", []),
    ("tensorrt", "fp16", _tensorrt_args()),
    ("tensorrt", "fp32", _tensorrt_args()),
    ("onnxruntime", "fp32", []),
    ("onnxruntime", "fp16", []),
    ("onnxruntime", "int8", []),
    ("onnxruntime", "int4", []),
    ("openvino", "fp32", []),
    ("openvino", "fp16", []),
    ("openvino", "bf16", []),
    ("openvino", "int8", []),
    ("openvino", "int4", []),
]


@pytest.mark.parametrize("target,precision,extra", CASES)
def test_target_passes_parity_gates(target: str, precision: str, extra: list[str], tmp_path: Path,
                                    calibration_tiny: Path) -> None:
    target_obj = registry.get(target)
    reason = target_obj.check_available() if "--onnx-only" not in extra else None
    if reason:
        pytest.skip(f"{target}: {reason}")
    out = tmp_path / "artifact"
    result = cli_build(target, out, "--precision", precision, "--checkpoint", str(calibration_tiny), *extra)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["status"] == "passed", report["parity"]["failures"]
    quantized = precision in ("int8", "int4", "palette4")
    parity = report["parity"]["quality" if quantized else "fidelity"]
    print(f"{target}/{precision}: worst {parity['worst']}, corpus {parity['corpus']['mean_kl']:.3g}, "
          f"level {report['parity']['level']}")
    assert parity["status"] == "passed" and parity["precision_gates"] == precision
    if quantized:  # the artifact's own weights were read back and checked exactly
        assert report["parity"]["fidelity"]["weights"]["status"] == "passed"
    assert parity["case"]["prompt_lengths"][0] > 2 * 16  # crosses the tiny window twice
    # and one row reaches the model's max_position_embeddings (4096), where fp16 positions are inexact
    assert parity["case"]["positions"] == 4096 and any(s["step"] == "reach[2032:2048]" for s in parity["steps"])
    if precision == "fp32":
        assert parity["worst"]["max_abs"] <= 1e-4
    gen = cli.invoke(app, ["generate", str(out), "--prompt-ids", ",".join(map(str, range(1, 40))),
                           "--max-new-tokens", "8", "--json"])
    assert gen.exit_code == 0 and len(json.loads(gen.stdout)["token_ids"]) == 8
