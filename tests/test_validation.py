"""Validation: metrics on hand-made logits, gates that catch planted defects, report schema, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from exporter.config import preset
from exporter.manifest import read_manifest, write_manifest
from exporter.trace import TraceSpec, save_program, trace
from mistral_export.cli import app
from validation import metrics
from validation.gates import GATES, evaluate, gates_for
from validation.report import REPORT_SCHEMA

cli = CliRunner()


def test_metrics_known_answers() -> None:
    ref = np.array([[0.0, 0.0], [1.0, 2.0]])
    got = np.array([[0.0, math.log(3.0)], [1.0, 2.5]])
    assert metrics.max_abs(ref, got) == pytest.approx(math.log(3.0))
    assert metrics.mean_abs(ref, got) == pytest.approx((math.log(3.0) + 0.5) / 4)
    # KL([.5, .5] || [.25, .75]) = 0.5 ln(4/3) is the larger of the two rows.
    assert metrics.kl_divergence(ref, got) == pytest.approx(0.5 * math.log(4 / 3))
    assert metrics.kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert metrics.top1_agreement(np.array([[1, 0], [0, 1], [1, 0], [0, 1]]),
                                  np.array([[1, 0], [1, 0], [0, 1], [0, 1]])) == 0.5
    assert metrics.cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == pytest.approx(0.0)
    assert metrics.cosine(np.array([[1.0, 2.0]]), np.array([[2.0, 4.0]])) == pytest.approx(1.0)
    bad = metrics.step_metrics("s", ref, np.array([[np.nan, 0.0], [1.0, 2.0]]))
    assert bad.max_abs == float("inf") and bad.top1 == 0.0


def test_corpus_statistics_known_answers() -> None:
    from validation.corpus import Positions, rows, summarize, text, tokens

    pos = Positions()
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]))
    art = np.log(np.array([[0.25, 0.5, 0.25], [0.8, 0.1, 0.1]]))
    pos.add(ref, art, np.array([0, 1]))
    stats = summarize(pos)
    kl0 = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # KL([.5,.25,.25] || [.25,.5,.25])
    assert stats["mean_kl"] == pytest.approx(kl0 / 2) and stats["kl_percentiles"]["max"] == pytest.approx(kl0)
    assert stats["same_top_pct"] == 50.0  # row 0: the artifact's top token differs
    assert stats["delta_p_pct"]["mean"] == pytest.approx(100 * (0.25 - 0.5) / 2)
    assert stats["ppl_reference"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.1)) / 2))
    assert stats["ppl_ratio"] == pytest.approx(math.exp(-(math.log(0.25) - math.log(0.5)) / 2))
    assert len(stats["kl_quantiles"]) == 101
    ids, how = tokens(None, 512)
    assert how == "utf-8 bytes" and len(ids) == len(text().encode()) and max(ids) < 512
    assert all(w in text() for w in ("Le marché", "東京", "SELECT", "def rolling_slot", "299,792,458"))
    chunks = rows(ids, 16, 16)
    assert all(len(r) == 35 for r in chunks) and sum(map(len, chunks)) >= len(ids)


def test_gates_collect_every_failure() -> None:
    good = metrics.StepMetrics("decode[0]", 2, 1e-6, 1e-7, 1.0, 1.0, 0.0)
    bad = metrics.StepMetrics("decode[1]", 2, 1e-2, 1e-7, 0.5, 0.5, 0.0)
    failures = evaluate([good, bad], {"teacher_forced_match": 0.5, "free_running_match": 1.0}, GATES["fp32"])
    names = sorted((f.metric, f.step) for f in failures)
    assert names == [("cosine", "decode[1]"), ("max_abs", "decode[1]"), ("teacher_forced_match", "generation"),
                     ("top1", "all positions")]
    assert "max_abs at decode[1] = 0.01, must be <= 0.0001" in [str(f) for f in failures]
    assert gates_for("palette4") == GATES["int4"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v") / "ref"
    result = cli.invoke(app, ["build", "--target", "reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _copy(src: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(src, dest)
    return dest


def _restamp(folder: Path) -> None:
    """Re-hash the files after planting a defect, so only the gates can catch it."""
    write_manifest(folder, read_manifest(folder, verify=False))


def _validate(folder: Path, *extra: str) -> object:
    result = cli.invoke(app, ["validate", str(folder), "--no-latency", *extra])
    print(result.output)
    return result


def test_build_writes_reports_that_match_the_schema(artifact: Path) -> None:
    rep = json.loads((artifact / "report.json").read_text())
    jsonschema.validate(rep, REPORT_SCHEMA)
    assert rep["parity"]["status"] == "passed" and rep["parity"]["level"] == "device"
    assert rep["latency"]["status"] == "measured" and rep["latency"]["decode"]
    assert (artifact / "latency.png").stat().st_size > 1000 and (artifact / "parity.png").stat().st_size > 1000
    fidelity = rep["parity"]["fidelity"]
    assert rep["schema_version"] == 2 and rep["parity"]["quality"]["status"] == "same-as-fidelity"
    assert "top1_worst_step" in fidelity["worst"] and all("top1" in s for s in fidelity["steps"])
    corpus = fidelity["corpus"]
    assert corpus["positions"] > 1000 and set(corpus["kl_percentiles"]) == {"max", "p99.9", "p99", "p95", "p90",
                                                                            "median"}
    assert corpus["ppl_ratio"] == pytest.approx(1.0) and corpus["same_top_pct"] == 100.0
    assert rep["parity"]["reference"]["weights"] == "preset:tiny:seed0"
    assert "## Parity: **passed**" in (artifact / "report.md").read_text()
    # The dimensions validated are stated, so a reduced-layer copy of a large model reads as one.
    tiny = preset("tiny")
    shape = f"{tiny.num_hidden_layers} layers, hidden {tiny.hidden_size},"
    assert rep["artifact"]["shape"].startswith(shape) and f"Model: {shape}" in (artifact / "report.md").read_text()
    manifest = read_manifest(artifact)
    assert manifest["validation"]["status"] == "passed"
    assert {"report.json", "report.md", "latency.png"} <= {f["path"] for f in manifest["files"]}


def test_validate_and_bench_cli(artifact: Path, tmp_path: Path) -> None:
    folder = _copy(artifact, tmp_path / "a")
    assert _validate(folder).exit_code == 0
    result = _validate(folder, "--precision-gates", "int3")
    assert result.exit_code == 2 and "valid: fp32" in result.output
    bench = cli.invoke(app, ["bench", str(folder), "--json"])
    assert bench.exit_code == 0 and json.loads(bench.output)["parity"]["status"] == "not-run"


def _plant_perturbed_weight(folder: Path) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.mlp.down_proj.weight"][3, 5] += 0.05
    save_file(state, path)


def _plant_window_off_by_one(folder: Path) -> None:
    cfg = preset("tiny")
    wrong = trace(TraceSpec(type(cfg)(**{**cfg.to_dict(), "sliding_window": cfg.sliding_window - 1}),
                            cfg.sliding_window, torch.float32))
    save_program(wrong, folder / "program.pt2")


def _plant_swapped_kv_heads(folder: Path) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    d = preset("tiny").head_dim
    for proj in ("k_proj", "v_proj"):
        w = state[f"model.layers.0.self_attn.{proj}.weight"]
        state[f"model.layers.0.self_attn.{proj}.weight"] = torch.cat([w[d:2 * d], w[:d], w[2 * d:]])
    save_file(state, path)


def test_program_of_another_window_is_refused_at_load(artifact: Path, tmp_path: Path) -> None:
    """program.pt2 is read without pickle and checked against the manifest: a program traced with
    the window one short is refused before it can run (exit 2, naming the window)."""
    folder = _copy(artifact, tmp_path / "planted")
    _plant_window_off_by_one(folder)
    _restamp(folder)
    result = _validate(folder)
    assert result.exit_code == 2 and "attention window [15], expected 16" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("plant", [_plant_perturbed_weight, _plant_swapped_kv_heads])
def test_gates_catch_planted_defects(artifact: Path, tmp_path: Path, plant) -> None:
    folder = _copy(artifact, tmp_path / "planted")
    plant(folder)
    _restamp(folder)
    result = _validate(folder)
    assert result.exit_code == 3
    assert "parity gate(s) failed, first:" in result.output and "threshold" in result.output
    rep = json.loads((folder / "report.json").read_text())
    assert rep["parity"]["status"] == "failed" and rep["parity"]["failures"]
    assert read_manifest(folder)["validation"]["status"] == "failed"


def test_bf16_reference_is_recorded_and_gates_loosened(artifact: Path, tmp_path: Path) -> None:
    """At scale the reference runs in bf16 (an fp32 7B would not fit); the report says so and the gates
    are no tighter than bf16's."""
    folder = _copy(artifact, tmp_path / "a")
    result = _validate(folder, "--reference-dtype", "bf16")
    rep = json.loads((folder / "report.json").read_text())
    parity = rep["parity"]
    print("fp32 artifact vs bf16 reference:", parity["fidelity"]["worst"])
    assert parity["reference"]["dtype"] == "bfloat16" and "no trace cache" in parity["reference"]["kind"]
    fidelity = parity["fidelity"]
    assert fidelity["precision_gates"] == "fp32+bf16-reference" and fidelity["gates"]["max_abs"] == GATES["bf16"]["max_abs"]
    assert result.exit_code == 0 and parity["status"] == "passed"
    jsonschema.validate(json.loads((folder / "report.json").read_text()), REPORT_SCHEMA)


class _PositionRunner:
    """Logits that depend only on the position: token p % 4 leads, token (p + 1) % 4 trails it by
    `gap`; at position `flip` the trailing token leads by `lead` instead (a target that diverges there)."""

    capacity, window = 64, None

    def __init__(self, gap: float, flip: int | None = None, lead: float = 0.0) -> None:
        self.gap, self.flip, self.lead = gap, flip, lead

    def reset(self, batch_size: int) -> None:
        pass

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = np.zeros((*input_ids.shape, 4), dtype=np.float32)
        for (b, t), p in np.ndenumerate(positions):
            out[b, t, p % 4], out[b, t, (p + 1) % 4] = 1.0, 1.0 - self.gap
            if p == self.flip:
                out[b, t, (p + 1) % 4] = 1.0 + self.lead
        return out


@pytest.mark.parametrize("gap,counted", [(1e-5, 1.0), (0.5, 0.25)])
def test_free_running_divergence_at_a_near_tie_is_not_a_failure(gap: float, counted: float) -> None:
    """The first divergence counts against free_running_match unless the reference's own margin there
    is within the row's logit tolerance (2 x max_abs): a near tie cannot fail a row whose max_abs passed."""
    from validation.gates import gates_for
    from validation.parity import ParityCase, compare

    case = ParityCase(prompts=[[0, 1, 2]], new_tokens=4, chunk=8, source="token-ids")
    # The new tokens come from the logits at positions 2..5; the target flips at position 3 (new token 1),
    # by as little as the reference's gap over it (a tie within fp32's 1e-4) or by a wide one.
    result = compare(_PositionRunner(gap), _PositionRunner(gap, flip=3, lead=gap), case, gates_for("fp32"))
    generation = result.generation
    assert generation["first_divergence"] == [1]
    assert generation["target_tokens"][0][:2] != generation["reference_tokens"][0][:2]
    assert generation["divergence_margin"][0] == pytest.approx(gap, rel=1e-2)  # float32 logits
    assert generation["free_running_match"] == counted
