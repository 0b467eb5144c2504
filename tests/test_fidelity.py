"""Validation that cannot be fooled: for quantized artifacts of every target that runs here, a clean
artifact passes, and each planted defect (window off by one, swapped KV heads, one perturbed scale)
fails the fidelity gate with exit 3, whatever the quality comparison says."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from benchmarks import defects
from mistral_export.cli import app
from pipeline.build import BuildRequest, build
from targets import registry
from validation.report import REPORT_SCHEMA

cli = CliRunner()
CASES = [("onnxruntime", "int4"), ("onnxruntime", "int8"), ("openvino", "int4"), ("openvino", "int8"),
         ("coreml", "int4")]
PLANTS = {"window": defects.window_off_by_one, "kv_heads": defects.swapped_kv_heads}


@pytest.fixture(scope="module", params=CASES, ids=[f"{t}-{p}" for t, p in CASES])
def artifacts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              calibration_tiny: Path) -> dict[str, Path]:
    target, precision = request.param
    reason = registry.get(target).check_available()
    if reason:
        pytest.skip(f"{target}: {reason}")
    work = tmp_path_factory.mktemp(f"{target}-{precision}")
    built = {}
    for name, plant in [("clean", None), *PLANTS.items()]:
        out = work / name
        with plant() if plant else nullcontext():
            build(BuildRequest(target=target, precision=precision, out=out, checkpoint=calibration_tiny))
        built[name] = out
    built["scale"] = Path(shutil.copytree(built["clean"], work / "scale"))
    defects.perturbed_scale(built["scale"])
    return built


def _validate(folder: Path) -> tuple[Any, dict[str, Any]]:
    result = cli.invoke(app, ["validate", str(folder), "--no-latency"])
    print(result.output)
    report = json.loads((folder / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    return result, report["parity"]


def test_clean_artifact_passes_both_questions(artifacts: dict[str, Path]) -> None:
    result, parity = _validate(artifacts["clean"])
    fidelity, quality = parity["fidelity"], parity["quality"]
    print("clean fidelity", fidelity["worst"], fidelity["corpus"]["mean_kl"], "quality", quality["worst"])
    assert result.exit_code == 0 and parity["status"] == "passed"
    assert fidelity["weights"]["status"] == "passed" and fidelity["weights"]["checked"] > 0
    assert fidelity["reference_weights"].startswith("the artifact's own weights")
    assert quality["reference_weights"] == "the source checkpoint" and quality["status"] == "passed"
    # Fidelity compares like with like: tighter than the comparison with the float model.
    assert fidelity["corpus"]["mean_kl"] < quality["corpus"]["mean_kl"]


@pytest.mark.parametrize("defect", ["window", "kv_heads", "scale"])
def test_planted_defects_fail_the_fidelity_gate(artifacts: dict[str, Path], defect: str) -> None:
    result, parity = _validate(artifacts[defect])
    fidelity = parity["fidelity"]
    sections = {f["section"] for f in parity["failures"]}
    print(defect, "fidelity", fidelity["worst"], fidelity["weights"], "quality", parity["quality"]["status"])
    assert result.exit_code == 3 and fidelity["status"] == "failed" and "fidelity" in sections
    if defect == "window":  # a graph defect: the weights are right, the arithmetic is not
        assert fidelity["weights"]["status"] == "passed"
        assert any(f["metric"] in ("kl", "corpus_mean_kl", "corpus_kl_p99") for f in fidelity["failures"])
    else:  # a weight defect: caught exactly, by name
        assert fidelity["weights"]["status"] == "failed"
        wanted = "model.layers.1.mlp.down_proj" if defect == "scale" else "model.layers.0.self_attn"
        assert any(m.startswith(wanted) for m in fidelity["weights"]["mismatches"]), fidelity["weights"]
