"""Many targets from one trace: one artifact each, build-summary.json, a failing target is reported
and does not stop the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mistral_export.cli import app

cli = CliRunner()


def test_two_targets_share_one_trace(tmp_path: Path, calibration_tiny: Path) -> None:
    result = cli.invoke(app, ["build", "--target", "reference,coreml", "--precision", "fp32", "--out", str(tmp_path),
                              "--checkpoint", str(calibration_tiny), "--no-validate"])
    print(result.output)
    assert result.exit_code == 0
    summary = json.loads((tmp_path / "build-summary.json").read_text())
    assert summary["traces"] == 1 and [r["status"] for r in summary["targets"]] == ["built", "built"]
    for row in summary["targets"]:
        assert json.loads((Path(row["artifact"]) / "manifest.json").read_text())["target"]["name"] == row["target"]


def test_a_failing_target_does_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from targets.reference import ReferenceTarget

    def broken(self, inp, out_dir):
        raise RuntimeError("lowering bug")

    monkeypatch.setattr(ReferenceTarget, "lower", broken)
    result = cli.invoke(app, ["build", "--target", "reference,tensorrt", "--out", str(tmp_path), "--no-validate",
                              "--json"])
    summary = json.loads(result.stdout)
    rows = {r["target"]: r for r in summary["targets"]}
    assert rows["reference"]["status"] == "failed" and "lowering bug" in rows["reference"]["error"]
    assert rows["reference"]["kind"] == "internal" and result.exit_code == 1
    assert rows["tensorrt"]["status"] == "failed" and rows["tensorrt"]["kind"] == "input" or \
        rows["tensorrt"]["status"] == "built"
    assert not (tmp_path / "tiny-reference-fp32").exists()


def test_unknown_target_in_a_list_fails_before_work(tmp_path: Path) -> None:
    result = cli.invoke(app, ["build", "--target", "reference,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "valid targets" in result.output and not list(tmp_path.iterdir())
