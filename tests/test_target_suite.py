"""The black-box suite every target passes: build the tiny preset, validate it through the Runner
contract against the canonical fp32 reference (past the window, batch 2 ragged), generate.

A target is added here with the precisions it supports; where its runtime is missing the case
skips with the target's own one-line reason, never passes silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mistral_export.cli import app
from targets import registry

cli = CliRunner()

# The tiny preset's random logits are near-flat (top-1/top-2 gap as small as 1% of their spread), so
# weight-only int8/int4 noise flips the argmax of some decode positions and the per-step top1 gates
# fail though KL and cosine pass by orders of magnitude; tests/test_onnxruntime.py checks those
# artifacts exactly against their dequantized weights instead. Strict: a pass here must be noticed.
_TIE_FLIPS = pytest.mark.xfail(strict=True, reason="tiny preset logits are near-ties: per-step top1 gate "
                               "fails under weight-only quantization noise (KL <= 4e-4, cosine >= 0.98)")

CASES = [
    ("reference", "fp32"),
    ("reference", "bf16"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "fp16"),
    pytest.param("onnxruntime", "int8", marks=_TIE_FLIPS),
    pytest.param("onnxruntime", "int4", marks=_TIE_FLIPS),
]


@pytest.mark.parametrize("target,precision", CASES)
def test_target_passes_parity_gates(target: str, precision: str, tmp_path: Path) -> None:
    reason = registry.get(target).check_available()
    if reason:
        pytest.skip(f"{target}: {reason}")
    out = tmp_path / "artifact"
    result = cli.invoke(app, ["build", "--target", target, "--precision", precision, "--out", str(out)])
    print(result.output)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    parity = report["parity"]
    print(f"{target}/{precision}: worst {parity['worst']}, level {parity['level']}")
    assert parity["status"] == "passed" and parity["precision_gates"] == precision
    assert parity["case"]["prompt_lengths"][0] > 2 * 16  # crosses the tiny window twice
    if precision == "fp32":
        assert parity["worst"]["max_abs"] <= 1e-4
    gen = cli.invoke(app, ["generate", str(out), "--prompt-ids", ",".join(map(str, range(1, 40))),
                           "--max-new-tokens", "8", "--json"])
    assert gen.exit_code == 0 and len(json.loads(gen.stdout)["token_ids"]) == 8
