"""Core ML target: package structure, MIL-level execution, compression ratios, bad input.

Core ML cannot predict on Linux: parity here is at level `mil-reference` (the converted MIL run by
coremltools' own value inference). The device path runs only on macOS and skips elsewhere.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest

from targets import registry
from tests.conftest import cli_build

pytestmark = pytest.mark.skipif(registry.get("coreml").check_available() is not None,
                                reason=f"coreml: {registry.get('coreml').check_available()}")


def _build(out: Path, precision: str, *extra: str) -> object:
    return cli_build("coreml", out, "--precision", precision, *extra)


@pytest.fixture(scope="module")
def fp16_artifact(tmp_path_factory: pytest.TempPathFactory, calibration_tiny: Path) -> Path:
    out = tmp_path_factory.mktemp("coreml") / "fp16"
    assert _build(out, "fp16", "--checkpoint", str(calibration_tiny)).exit_code == 0
    return out


def _weights_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in (artifact / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights")
               .iterdir())


def test_package_has_functions_states_and_sdpa(fp16_artifact: Path) -> None:
    from targets.coreml.lower import quiet_coremltools
    from targets.coreml.mil_eval import op_types
    from targets.coreml.runner import load_mil_program

    ct = quiet_coremltools()
    spec = ct.utils.load_spec(str(fp16_artifact / "model.mlpackage"))
    functions = {f.name: f for f in spec.description.functions}
    # The default prefill lengths 64, 256, 1024 are capped at the tiny model's capacity of 16.
    assert set(functions) == {"prefill_16", "decode"} and spec.description.defaultFunctionName == "decode"
    for name, chunk in (("prefill_16", 16), ("decode", 1)):
        f = functions[name]
        assert [i.name for i in f.input] == ["input_ids", "positions"]
        assert list(f.input[0].type.multiArrayType.shape) == [1, chunk]
        assert [o.name for o in f.output] == ["logits"]
        states = {s.name: s.type.stateType.arrayType for s in f.state}
        assert set(states) == {f"{k}_cache_{i}" for k in "kv" for i in range(2)}
        assert all(list(a.shape) == [1, 2, 16, 16] and a.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
                   for a in states.values())
    program = load_mil_program(fp16_artifact / "model.mlpackage")
    for name in ("prefill_16", "decode"):
        ops = op_types(program.functions[name])
        print(name, {k: ops[k] for k in ("scaled_dot_product_attention", "read_state", "coreml_update_state")})
        assert ops["scaled_dot_product_attention"] == 2 and ops["coreml_update_state"] == 4
    manifest = json.loads((fp16_artifact / "manifest.json").read_text())
    assert manifest["target"]["compute_units"] == "ALL" and manifest["cache"]["residence"] == "stateful"
    assert [p["file"] for p in manifest["target"]["pipeline"]["parts"]] == ["model.mlpackage"]  # auto: one part


def test_functions_share_one_copy_of_the_weights(fp16_artifact: Path) -> None:
    # prefill_16 and decode bind the same arrays and are deduplicated across functions: the weight file
    # holds each parameter once in fp16 (plus small constants), not once per function.
    from exporter.config import MistralConfig
    from exporter.model import parameter_shapes

    cfg = MistralConfig(**json.loads((fp16_artifact / "manifest.json").read_text())["model"]["config"])
    fp16_bytes = 2 * sum(int(np.prod(shape)) for shape in parameter_shapes(cfg).values())
    assert fp16_bytes <= _weights_bytes(fp16_artifact) < 1.2 * fp16_bytes


def test_mil_reference_parity_is_labelled(fp16_artifact: Path) -> None:
    report = json.loads((fp16_artifact / "report.json").read_text())
    assert report["parity"]["status"] == "passed"
    if platform.system() != "Darwin":
        assert report["parity"]["level"] == "mil-reference" and report["latency"]["level"] == "mil-reference"
    print("coreml fp16 worst:", report["parity"]["fidelity"]["worst"])


@pytest.mark.parametrize("precision,most", [("int8", 0.6), ("int4", 0.4), ("palette4", 0.4)])
def test_compression_shrinks_weights(fp16_artifact: Path, tmp_path: Path, precision: str, most: float,
                                     calibration_tiny: Path) -> None:
    out = tmp_path / precision
    result = _build(out, precision, "--no-validate", "--checkpoint", str(calibration_tiny))
    assert result.exit_code == 0
    ratio = _weights_bytes(out) / _weights_bytes(fp16_artifact)
    print(f"{precision}: weight file {_weights_bytes(out)} bytes, {ratio:.2f}x of fp16")
    assert ratio <= most
    if precision == "palette4":
        # Its weights read back from the palettized MIL consts equal the source palettized again (the exact
        # part of fidelity; int8 and int4 are validated whole in test_target_suite.py and test_fidelity.py).
        from exporter.manifest import read_manifest
        from exporter.sources import open_source
        from targets.coreml.readback import readback

        back = readback(out, read_manifest(out), open_source(calibration_tiny, None))
        assert back.unchecked is None and back.checked > 0 and back.mismatches == [], back.mismatches


@pytest.mark.parametrize("option,needle", [
    ("deployment_target=iOS17", "Core ML state needs iOS18"),
    ("compute_units=GPU_ONLY", "valid: CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL"),
    ("chunks=3", "the model has 2 layers, so give 1 to 2 parts"),
    ("chunks=two", "neither a number of parts nor auto"),
    ("prefill_chunks=1,8", "lengths of at least 2"),
    ("prefill_chunks=8,x", "not a comma-separated list"),
])
def test_bad_options(tmp_path: Path, option: str, needle: str) -> None:
    result = _build(tmp_path / "x", "fp16", "--option", option, "--no-validate")
    assert result.exit_code == 2 and needle in result.output
    assert not (tmp_path / "x").exists()


def test_coremltools_root_logger_chatter_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    # coremltools' quantizer logs "Invalid block_sizes" on the root logger for every 1-D weight an int4
    # build leaves in fp16; ours and other libraries' root warnings still show.
    import logging

    from targets.coreml.lower import quiet_coremltools

    quiet_coremltools()
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils

    with caplog.at_level(logging.WARNING):
        assert _utils.compute_qparams_by_dtype(np.ones(30, np.float32), types.int4, "LINEAR_SYMMETRIC", [32]) is None
        logging.getLogger().warning("a root warning of another library")
    assert [r.getMessage() for r in caplog.records] == ["a root warning of another library"]


def _empty_states() -> dict[str, np.ndarray]:
    """The tiny preset's fp16 KV states (batch 1, 2 KV heads, capacity 16, head dim 16), zeroed."""
    return {f"{k}_cache_{i}": np.zeros((1, 2, 16, 16), np.float16) for k in "kv" for i in range(2)}


def test_an_op_without_value_inference_is_an_error(fp16_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from targets.coreml import mil_eval
    from targets.coreml.runner import load_mil_program

    monkeypatch.setattr(mil_eval, "_SUPPLEMENT", {})
    program = load_mil_program(fp16_artifact / "model.mlpackage")
    states = _empty_states()
    with pytest.raises(mil_eval.MilEvalError, match="'silu'"):
        mil_eval.run_function(program.functions["decode"], {"input_ids": np.array([[1]]),
                                                            "positions": np.array([[0]])}, states)


def test_fp32_accumulated_products_agree_with_coremltools_value_inference(
        fp16_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The interpreter's own linear/matmul/attention (fp32 accumulation) against coremltools' value
    # inference of the same ops (numpy fp16), on the first prefill function from an empty cache.
    from targets.coreml import mil_eval
    from targets.coreml.runner import load_mil_program

    program = load_mil_program(fp16_artifact / "model.mlpackage")
    name = next(n for n in program.functions if n.startswith("prefill_"))
    function = program.functions[name]
    length = function.inputs["input_ids"].shape[1]
    assert {"linear", "scaled_dot_product_attention"} <= set(mil_eval.op_types(function))
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(0, 256, (1, length)), "positions": np.arange(length)[None]}

    def logits(supplement: dict) -> np.ndarray:
        monkeypatch.setattr(mil_eval, "_SUPPLEMENT", supplement)
        states = _empty_states()
        return mil_eval.run_function(function, inputs, states)["logits"].astype(np.float32)

    ours = logits(dict(mil_eval._SUPPLEMENT))
    theirs = logits({"silu": mil_eval._silu})
    assert np.isfinite(ours).all() and ours.std() > 0
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML predict needs macOS 15+ (this is "
                    f"{platform.system()}); the MIL-level check above covers the converted program")
def test_device_predict_matches_mil(fp16_artifact: Path) -> None:
    from targets.coreml.runner import DeviceRunner, MilRunner

    from exporter.manifest import read_manifest
    from targets.coreml.pipeline import load

    args = (load(fp16_artifact, read_manifest(fp16_artifact)), 16, 16, (1, 2, 16, 16))
    device, mil = DeviceRunner(*args, compute_units="CPU_ONLY"), MilRunner(*args)
    ids, pos = np.arange(1, 21)[None], np.arange(20)[None]
    for runner in (device, mil):
        runner.reset(1)
    got = [r.step(ids[:, :16], pos[:, :16]) for r in (device, mil)]
    assert np.abs(got[0] - got[1]).max() < 2e-2


def test_weight_free_conversion_keeps_placeholders_zero_stride() -> None:
    # coremltools' fp16 pass would cast each placeholder into a dense array (half the part's fp32 bytes,
    # only to be replaced when the weights are bound); ours keeps every weight const one broadcast zero.
    import torch

    from exporter.attention import decompose
    from exporter.config import preset
    from exporter.trace import TraceSpec, traced
    from targets.coreml.lower import IdsWrapper, _pipeline, quiet_coremltools
    from targets.coreml.weights import mil_name

    ct = quiet_coremltools()
    cfg = preset("tiny")
    program = traced(TraceSpec(cfg, 16, torch.float32)).program
    wrapper = IdsWrapper(decompose(program, expand_gqa=True).module(), cfg, 16, torch.float32,
                         range(cfg.num_hidden_layers))
    exported = torch.export.export(wrapper, (torch.zeros(1, 4, dtype=torch.long),
                                             torch.arange(4).unsqueeze(0))).run_decompositions({})
    mil = ct.convert(exported, convert_to="milinternal", minimum_deployment_target=ct.target.iOS18,
                     compute_precision=ct.precision.FLOAT16, outputs=[ct.TensorType(name="logits")],
                     pass_pipeline=_pipeline(ct, True))
    consts = {op.name: op.outputs[0].val for op in mil.functions["main"].operations if op.op_type == "const"}
    for name in program.state_dict:
        value = consts[mil_name(name, True)]
        assert value.dtype == np.float16 and value.size > 1 and not any(value.strides), name


def test_fp16_products_accumulate_in_fp32() -> None:
    # 14336 positive terms of about 0.25: summed in fp16 the running total stalls far below 3584 (its
    # ulp there is 2); accumulated in fp32 and rounded once, it is within one fp16 ulp of float64.
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from targets.coreml import mil_eval

    rng = np.random.default_rng(0)
    weight = rng.random((8, 14336)).astype(np.float16)
    x = rng.random((1, 14336)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 14336), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):  # noqa: ANN001, ANN202 - the MIL builder's signature
        return mb.linear(x=x, weight=weight), mb.matmul(x=x, y=weight, transpose_y=True)

    exact = x.astype(np.float64) @ weight.astype(np.float64).T
    ulp = np.spacing(np.float16(exact.max()))
    serial = np.cumsum(x * weight, axis=-1, dtype=np.float16)[:, -1]  # the defect this guards: fp16 sums
    assert np.abs(serial - exact).max() > 100 * ulp
    for value in mil_eval.run_function(program.functions["main"], {"x": x}, {}).values():
        assert value.dtype == np.float16
        assert np.abs(value - exact).max() <= ulp


def test_mil_execution_leaves_the_package_untouched(fp16_artifact: Path) -> None:
    # Validation reads the artifact; coremltools' load_spec would rewrite each package's Manifest.json.
    from targets.coreml.runner import load_mil_program

    def stamps() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in fp16_artifact.rglob("*")}

    before = stamps()
    program = load_mil_program(fp16_artifact / "model.mlpackage")
    assert any(name.startswith("prefill_") for name in program.functions)
    assert stamps() == before
