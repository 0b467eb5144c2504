"""Validation reaches far positions: a windowed model's artifact is checked up to its own
max_position_embeddings (at most validation.parity.REACH), and a float artifact whose rotary angles a
low-precision device computes in fp16 (right at the first positions, off by hundreds) fails it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import defects
from pipeline.build import BuildRequest, build
from targets import registry
from validation.parity import REACH, REACH_DECODE, compare, default_case
from validation.stage import build_validator


def test_reach_row_covers_the_model_positions_within_what_the_artifact_holds() -> None:
    case = default_case(16, 16, 512, positions=4096)
    assert case.describe()["positions"] == len(case.reach) == 4096
    assert default_case(16, 16, 512, positions=10 ** 6).describe()["reach"] == REACH
    assert len(default_case(16, 16, 512, positions=4096, held=1000).reach) == 1000  # a RoPE table of 1000
    assert default_case(64, None, 512, positions=4096).reach == []  # the context bounds every position
    assert default_case(16, 16, 512, positions=40).reach == []  # the batch already covers them


class _Drifting:
    """A runner that agrees with another until `after` positions, then drifts by `by` per logit."""

    def __init__(self, inner: object, after: int, by: float) -> None:
        self.inner, self.after, self.by = inner, after, by
        self.capacity, self.window = inner.capacity, inner.window  # type: ignore[attr-defined]

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)  # type: ignore[attr-defined]

    def step(self, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        out = self.inner.step(ids, pos)  # type: ignore[attr-defined]
        return out + self.by * (pos[..., None] >= self.after)


def test_a_drift_past_the_batch_fails_only_through_the_reach_row() -> None:
    from exporter.config import preset
    from exporter.checkpoint import PresetWeights
    from validation.gates import gates_for
    from validation.reference import EagerRunner

    cfg = preset("tiny")
    weights = PresetWeights("tiny", 0)
    runner = lambda: EagerRunner(cfg, 16, lambda n: weights.parameter(n, None), __import__("torch").float32)  # noqa: E731
    case = default_case(16, 16, cfg.vocab_size, new_tokens=4, positions=1024)
    result = compare(runner(), _Drifting(runner(), 500, 0.05), case, gates_for("fp16"))
    failed = {f.step for f in result.failures}
    assert failed and all(s.startswith("reach") for s in failed), failed
    assert {"reach[496:512]", "reach[1008:1021]", *(f"reach decode@{p}" for p in range(1021, 1021 + REACH_DECODE))} <= failed


def _planted(target: str, precision: str, out: Path, checkpoint: Path) -> dict:
    with defects.low_precision_rotary():
        build(BuildRequest(target=target, precision=precision, out=out, checkpoint=checkpoint),
              validator=build_validator(latency=False))
    return json.loads((out / "report.json").read_text())["parity"]


def test_coreml_fp16_rotary_angles_fail_validation(tmp_path: Path, calibration_tiny: Path) -> None:
    reason = registry.get("coreml").check_available()
    if reason:
        pytest.skip(f"coreml: {reason}")
    parity = _planted("coreml", "fp16", tmp_path / "coreml", calibration_tiny)
    failed = {f["step"] for f in parity["failures"]}
    print("coreml planted:", parity["fidelity"]["worst"], sorted(failed))
    assert parity["status"] == "failed" and "reach[2032:2048]" in failed
    assert not any(s.startswith(("prefill", "decode")) for s in failed)  # the 35-token batch alone passes


def test_openvino_f16_rotary_angles_fail_validation(tmp_path: Path, calibration_tiny: Path) -> None:
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'mistral-export[openvino]')")
    if "FP16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("openvino: this CPU has no f16 arithmetic, so the runner computes an fp16 IR in f32")
    parity = _planted("openvino", "fp16", tmp_path / "openvino", calibration_tiny)
    failed = {f["step"] for f in parity["failures"]}
    print("openvino planted:", parity["fidelity"]["worst"], sorted(failed))
    assert parity["status"] == "failed" and "reach[2032:2048]" in failed


def test_openvino_ir_marks_the_rotary_path_precise(tmp_path: Path, calibration_tiny: Path) -> None:
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'mistral-export[openvino]')")
    from targets.openvino.marks import PRECISE, is_marked, rotary_nodes

    out = tmp_path / "ov"
    build(BuildRequest(target="openvino", precision="fp16", out=out, checkpoint=calibration_tiny), validator=None)
    model = ov.Core().read_model(out / "openvino_model.xml")
    names = rotary_nodes(model)
    marked = {op.get_friendly_name() for op in model.get_ordered_ops() if is_marked(op, PRECISE)}
    assert {"Cos", "Sin", "Multiply", "Concat"} <= {op.get_type_name() for op in model.get_ordered_ops()
                                                   if op.get_friendly_name() in names}
    assert marked == names
