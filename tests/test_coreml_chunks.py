"""Core ML in parts and with enumerated prefill lengths: a chunks=2 build with prefill_chunks=4,8 against
the one-part build with its single capacity-length prefill, at the MIL level (Core ML cannot predict
off macOS); the function choice per prompt length; the manifest's pipeline description and its checks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from exporter.config import preset
from exporter.errors import ArtifactError, UserError
from exporter.manifest import read_manifest
from targets import registry
from targets.coreml import pipeline
from targets.resources import GIB
from tests.conftest import cli_build

pytestmark = pytest.mark.skipif(registry.get("coreml").check_available() is not None,
                                reason=f"coreml: {registry.get('coreml').check_available()}")
FP16_MAX_ABS = 2e-2  # the fp16 gate (validation/gates.py), which both builds pass against the reference


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, calibration_tiny: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreml-chunks")
    whole, parts = root / "whole", root / "parts"
    assert cli_build("coreml", whole, "--precision", "fp16", "--checkpoint", str(calibration_tiny),
                     "--no-validate").exit_code == 0
    result = cli_build("coreml", parts, "--precision", "fp16", "--checkpoint", str(calibration_tiny),
                       "--option", "chunks=2", "--option", "prefill_chunks=4,8")
    assert result.exit_code == 0, result.output
    return {"whole": whole, "parts": parts}


def _runner(artifact: Path):
    manifest, runner = registry.load_runner(artifact, None)
    return runner


def test_schedule_picks_the_smallest_function_that_holds_the_rest() -> None:
    lengths = (64, 256, 1024)
    assert list(pipeline.schedule(1, lengths)) == [("decode", 1, 1)]
    assert list(pipeline.schedule(63, lengths)) == [("prefill_64", 64, 63)]
    assert list(pipeline.schedule(64, lengths)) == [("prefill_64", 64, 64)]
    assert list(pipeline.schedule(65, lengths)) == [("prefill_256", 256, 65)]
    assert list(pipeline.schedule(2100, lengths)) == [("prefill_1024", 1024, 1024)] * 2 + [("prefill_64", 64, 52)]
    assert list(pipeline.schedule(1025, lengths)) == [("prefill_1024", 1024, 1024), ("decode", 1, 1)]
    assert pipeline.prefill_lengths("1024,64,256,64", 512) == (64, 256, 512)


@pytest.mark.parametrize("precision", ["fp16", "int4", "fp32"])
def test_auto_chunks_fit_the_memory_given(precision: str) -> None:
    tiny, m7b = preset("tiny"), preset("mistral-7b-v0.1")
    assert pipeline.plan_parts(tiny, "auto", precision) == [(0, 2)]
    parts = pipeline.plan_parts(m7b, "auto", precision, available=20 * GIB)
    budget = pipeline.AUTO_BUDGET * 20 * GIB
    assert len(parts) > 1 and pipeline.conversion_bytes(m7b, parts, precision) <= budget
    fewer = pipeline.split_layers(32, len(parts) - 1)
    assert pipeline.conversion_bytes(m7b, fewer, precision) > budget  # the fewest parts that fit
    assert parts[0][0] == 0 and parts[-1][1] == 32 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    with pytest.raises(UserError, match="even one layer per part"):
        pipeline.plan_parts(m7b, "auto", precision, available=GIB)


def test_compressed_conversion_is_planned_with_more_room_than_fp16() -> None:
    # Compression holds each function's compressed copy before sharing: int4 must never be planned
    # in fewer parts than fp16 on the same memory.
    m7b = preset("mistral-7b-v0.1")
    for available in (12 * GIB, 16 * GIB, 24 * GIB, 32 * GIB):
        assert len(pipeline.plan_parts(m7b, "auto", "int4", available)) >= len(
            pipeline.plan_parts(m7b, "auto", "fp16", available))


def test_parts_and_their_pipeline_description(builds: dict[str, Path]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from targets.coreml.lower import quiet_coremltools

    manifest = read_manifest(builds["parts"])
    desc = manifest["target"]["pipeline"]
    jsonschema.validate(desc, pipeline.PIPELINE_SCHEMA)
    jsonschema.validate(read_manifest(builds["whole"])["target"]["pipeline"], pipeline.PIPELINE_SCHEMA)
    assert [p["file"] for p in desc["parts"]] == ["part_0.mlpackage", "part_1.mlpackage"]
    assert desc["functions"] == {"prefill_4": 4, "prefill_8": 8, "decode": 1}
    ct = quiet_coremltools()
    for i, (entry, first, last) in enumerate(zip(desc["parts"], ("input_ids", "hidden"), ("hidden_out", "logits"))):
        assert entry["layers"] == [i, i + 1] and entry["states"] == [f"k_cache_{i}", f"v_cache_{i}"]
        spec = ct.utils.load_spec(str(builds["parts"] / entry["file"]))
        functions = {f.name: f for f in spec.description.functions}
        assert set(functions) == set(desc["functions"])
        for name, chunk in desc["functions"].items():
            f = functions[name]
            assert [x.name for x in f.input] == [first, "positions"] and [o.name for o in f.output] == [last]
            assert list(f.input[1].type.multiArrayType.shape) == [1, chunk]
            assert {s.name for s in f.state} == set(entry["states"])  # each part holds its own layers' caches
    report = json.loads((builds["parts"] / "report.json").read_text())
    assert report["parity"]["status"] == "passed" and report["parity"]["level"] == "mil-reference"
    padding = report["parity"]["padding"]
    assert padding["computed_tokens"] >= padding["real_tokens"] > 0 and manifest["validation"]["padding"] == padding
    print("validation prompts, prefill_chunks=4,8:", padding)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 13])
def test_prompt_lengths_run_through_the_right_functions_and_match_one_part(builds: dict[str, Path],
                                                                           length: int) -> None:
    """Past the window (16) by decoding to position 40 after the prompt; batch 1."""
    whole, parts = _runner(builds["whole"]), _runner(builds["parts"])
    calls: list[tuple[int, str]] = []
    original = parts._call
    parts._call = lambda part, function, *a: calls.append((part.start, function)) or original(part, function, *a)
    rng = np.random.default_rng(length)
    ids = rng.integers(1, 512, size=(1, 40))
    for runner in (whole, parts):
        runner.reset(1)
    got = [r.step(ids[:, :length], np.arange(length)[None]) for r in (whole, parts)]
    expected = [f for f, _, _ in pipeline.schedule(length, (4, 8))]
    assert [f for start, f in calls if start == 0] == expected and [f for start, f in calls if start == 1] == expected
    worst = float(np.abs(got[0] - got[1]).max())
    for p in range(length, 40):
        got = [r.step(ids[:, p:p + 1], np.array([[p]])) for r in (whole, parts)]
        worst = max(worst, float(np.abs(got[0] - got[1]).max()))
    print(f"prompt {length}: {calls[:4]}..., worst |whole - parts| {worst:.2e}")
    assert worst < FP16_MAX_ABS
    assert parts.padding()["computed_tokens"] - parts.padding()["real_tokens"] == sum(
        n - r for _, n, r in pipeline.schedule(length, (4, 8)))


def test_a_manifest_pipeline_that_leaves_the_artifact_is_refused(builds: dict[str, Path]) -> None:
    manifest = read_manifest(builds["parts"])
    for edit, needle in (
        (lambda d: d["parts"][0].update(file="../whole/model.mlpackage"), "leaves the artifact"),
        (lambda d: d["parts"][1].update(file="other.mlpackage"), "holds no listed file"),
        (lambda d: d["parts"].pop(), "the parts end at layer 1 of 2"),
        (lambda d: d["parts"][1].update(layers=[0, 2]), "expected to start at 1"),
        (lambda d: d["parts"][1].update(states=["k_cache_0", "v_cache_0"]), "not its layers' caches"),
        (lambda d: d["functions"].update(prefill_4=5), "not decode at 1 and prefill_<n> at n"),
        (lambda d: d.pop("parts"), "not valid"),
    ):
        hostile = copy.deepcopy(manifest)
        edit(hostile["target"]["pipeline"])
        with pytest.raises(ArtifactError, match=needle):
            pipeline.load(builds["parts"], hostile)
    # A part whose program or weights the file list does not hold (read from the package's fixed layout).
    for unlisted, needle in ((pipeline.PACKAGE_SPEC, "not among its files"),
                             (pipeline.PACKAGE_WEIGHTS, "holds no listed file")):
        hostile = copy.deepcopy(manifest)
        hostile["files"] = [e for e in hostile["files"] if not e["path"].startswith(f"part_1.mlpackage/{unlisted}")]
        with pytest.raises(ArtifactError, match=needle):
            pipeline.load(builds["parts"], hostile)
