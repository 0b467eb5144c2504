"""LoRA adapters merged at build time, against transformers + peft (PeftModel) as the independent reference.

The adapters are made by peft itself on the model the gates were calibrated on, with the factor PEFT
starts at zero randomized so the adapter changes the logits, and with rsLoRA and an alpha pattern so a
wrong scale shows. Every artifact is validated by the CLI (its reference merges the same adapter), and
its logits and greedy tokens are compared here with PeftModel's, past the window.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.manifest import read_manifest
from validation.gates import gates_for
from targets import registry
from tests.conftest import TOL, cli_build, cli_run, hf_model, one_line_error, prefill_then_decode, random_ids
from tests.conftest import save_checkpoint

peft = pytest.importorskip("peft", reason="peft is not installed (it is in the test extra)")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _hf(folder: Path) -> Any:
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def make_adapter(base: Path, out: Path, seed: int = 5, **config: Any) -> Path:
    """A peft LoRA adapter on the checkpoint at base. PEFT starts one factor at zero (a no-op); it is
    randomized here at a fine-tune's scale: the update is about a fifth of the weights it adapts."""
    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=8, target_modules=LINEAR)
    model = peft.get_peft_model(_hf(base), peft.LoraConfig(**{**settings, **config}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and not param.any():
                param.normal_(0.0, 0.05)
            elif "modules_to_save" in name:  # a trained copy differs from the base module
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def peft_reference(base: Path, adapter: Path) -> Any:
    return peft.PeftModel.from_pretrained(_hf(base), adapter).eval()


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by full forwards without a cache: nothing of the model's own decoding path."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, calibration_tiny: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(calibration_tiny, root / "adapter", use_rslora=True, alpha_pattern={"down_proj": 3},
                           modules_to_save=["embed_tokens"])
    return {"root": root, "base": calibration_tiny, "adapter": adapter,
            "peft": peft_reference(calibration_tiny, adapter), "plain": _hf(calibration_tiny)}


@pytest.mark.parametrize("target,precision,extra", [
    ("reference", "fp32", []), ("onnxruntime", "fp32", []), ("openvino", "fp32", []),
    ("tensorrt", "fp32", ["--onnx-only"]), ("coreml", "fp16", []),
    ("onnxruntime", "int8", []), ("openvino", "int4", [])])
def test_merged_artifact_equals_transformers_plus_peft(lora: dict[str, Any], target: str, precision: str,
                                                       extra: list[str]) -> None:
    reason = registry.get(target).check_available() if not extra else None
    if reason:
        pytest.skip(f"{target}: {reason}")
    out = lora["root"] / f"{target}-{precision}"
    result = cli_build(target, out, "--precision", precision, "--checkpoint", str(lora["base"]),
                       "--adapter", str(lora["adapter"]), *extra)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["status"] == "passed", report["parity"]["failures"]
    manifest = read_manifest(out)
    recorded = manifest["model"]["adapter"]
    assert recorded["config"]["use_rslora"] is True and recorded["merge"] == "merged"
    assert {f["path"] for f in recorded["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    assert recorded["weights"]["model.embed_tokens.weight"] == "replaced"
    assert len(recorded["weights"]) == 1 + 7 * 2 + 1  # embed, 7 linears x 2 layers, lm_head
    if precision in ("int8", "int4"):  # quantized from the merged weights: the readback says so exactly
        assert report["parity"]["fidelity"]["weights"]["status"] == "passed"
        return
    _, runner = registry.load_runner(out)
    vocab = manifest["model"]["config"]["vocab_size"]
    prompts = [random_ids(40, vocab, 11), random_ids(23, vocab, 12)]  # window 16: both rows pass it
    ours = prefill_then_decode(runner, prompts, [9, 4])
    worst = plain = 0.0
    with torch.no_grad():
        for b, p in enumerate(prompts):
            want = lora["peft"](torch.tensor([p])).logits[0].numpy()
            worst = max(worst, float(np.abs(ours[b, :len(p)] - want).max()))
            plain = max(plain, float(np.abs(lora["plain"](torch.tensor([p])).logits[0].numpy() - want).max()))
    print(f"{target}: max abs logit error vs transformers + peft {worst:.2e} (the adapter moves logits {plain:.2f})")
    bound = TOL if precision == "fp32" else gates_for(precision)["max_abs"]  # the artifact's own gate row
    assert worst <= bound < plain / 10  # within the gate, and the adapter moves logits far more
    if precision != "fp32":  # greedy ties may break differently in fp16
        return
    prompt = prompts[0][:20]
    gen = cli_run("generate", str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12", "--json")
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["token_ids"] == greedy(lora["peft"], prompt, 12)


def test_tied_embeddings_with_embedding_lora(tmp_path: Path) -> None:
    """An adapter on a tied model's embedding and lm_head unties them, as PEFT adapts each module alone."""
    model = hf_model(tie_word_embeddings=True)
    base = save_checkpoint(model, tmp_path / "tied")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens", "lm_head", "q_proj"])
    assert any("lora_embedding_A" in k for k in load_file(adapter / "adapter_model.safetensors"))
    out = tmp_path / "artifact"
    assert cli_build("reference", out, "--checkpoint", str(base), "--adapter", str(adapter)).exit_code == 0
    manifest = read_manifest(out)
    assert manifest["model"]["config"]["tie_word_embeddings"] is False
    _, runner = registry.load_runner(out)
    prompt = random_ids(30, 96, 4)
    ours = prefill_then_decode(runner, [prompt], [6])[0]
    with torch.no_grad():
        want = peft_reference(base, adapter)(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(ours - want).max() <= TOL


def test_reference_adapter_must_be_the_recorded_one(lora: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "adapter-copy"
    shutil.copytree(lora["adapter"], copy)
    out = tmp_path / "artifact"
    assert cli_build("reference", out, "--checkpoint", str(lora["base"]), "--adapter", str(copy),
                     "--no-validate").exit_code == 0
    tensors = load_file(copy / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, copy / "adapter_model.safetensors")
    one_line_error(cli_run("validate", str(out), "--no-latency"), "differs from the one this artifact was built with")
    assert not (out / "report.json").exists()
    ok = cli_run("validate", str(out), "--no-latency", "--reference-adapter", str(lora["adapter"]))
    assert ok.exit_code == 0, ok.output
    shutil.rmtree(copy)
    one_line_error(cli_run("validate", str(out), "--no-latency"), "--reference-adapter")


def _edited(src: Path, dst: Path, config: dict[str, Any] | None = None,
            tensors: Any = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        raw = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if tensors is not None:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def test_bad_adapters_are_refused_in_one_line(lora: dict[str, Any], tmp_path: Path) -> None:
    base, good = lora["base"], lora["adapter"]

    def refused(adapter: Path, needle: str) -> None:
        out = tmp_path / f"out-{adapter.name}"
        one_line_error(cli_build("reference", out, "--checkpoint", str(base), "--adapter", str(adapter)), needle)
        assert not out.exists()

    # Trained on another base model: its down_proj factors do not fit.
    other = tmp_path / "other-base"
    save_checkpoint(hf_model(vocab_size=512, intermediate_size=80, hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, sliding_window=16), other)
    refused(make_adapter(other, tmp_path / "wrong-shapes", target_modules=["down_proj"]), "trained on another base")
    refused(make_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True), "DoRA")
    ia3 = tmp_path / "ia3"
    torch.manual_seed(0)
    peft.get_peft_model(_hf(base), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"])).save_pretrained(ia3)
    refused(ia3, "peft_type 'IA3' is not supported")
    refused(_edited(good, tmp_path / "foreign-target", config={"target_modules": ["q_proj", "c_attn"]}),
            "target_modules ['c_attn']")
    refused(_edited(good, tmp_path / "foreign-tensor", tensors=lambda t: {
        **t, "base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.0.self_attn.c_attn.lora_B.weight": torch.zeros(64, 4)}),
        "targets model.layers.0.self_attn.c_attn, a module this model does not have")
    refused(_edited(good, tmp_path / "half", tensors=lambda t: {
        k: v for k, v in t.items() if k != "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"}),
        "only one of the two LoRA factors")
    refused(_edited(good, tmp_path / "nan", tensors=lambda t: {
        k: v * float("nan") if "layers.0.self_attn.q_proj.lora_A" in k else v for k, v in t.items()}), "NaN")
    refused(_edited(good, tmp_path / "bias", config={"bias": "lora_only"}), "bias='lora_only'")
    (broken := _edited(good, tmp_path / "broken-config")).joinpath("adapter_config.json").write_text("{nope")
    refused(broken, "is not valid JSON")


def test_a_pickled_adapter_is_never_loaded(lora: dict[str, Any], tmp_path: Path) -> None:
    """adapter_model.bin is a pickle: refused by name, never unpickled (planted: unpickling writes a file)."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(lora["adapter"] / "adapter_config.json", folder)
    marker = tmp_path / "unpickled"

    class Planted:
        def __reduce__(self) -> Any:
            return (Path.write_text, (marker, "ran"))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Planted()))
    one_line_error(cli_build("reference", tmp_path / "out", "--checkpoint", str(lora["base"]),
                             "--adapter", str(folder)), "adapter_model.bin is a pickle and is never read")
    assert not marker.exists()


# -- switchable adapters (onnxruntime, openvino) ------------------------------------------------------------


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def switchable(request: pytest.FixtureRequest, lora: dict[str, Any]) -> dict[str, Any]:
    """One fp32 artifact per target with two switchable adapters, built and validated by the CLI."""
    target = request.param
    if registry.get(target).check_available():
        pytest.skip(f"{target}: {registry.get(target).check_available()}")
    root, base = lora["root"], lora["base"]
    a = make_adapter(base, root / f"switch-a-{target}", seed=7)
    b = make_adapter(base, root / f"switch-b-{target}", seed=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     use_rslora=True, alpha_pattern={"v_proj": 2})
    out = root / f"switchable-{target}"
    result = cli_build(target, out, "--checkpoint", str(base), "--adapters", f"a={a}", "--adapters", f"b={b}")
    assert result.exit_code == 0, result.output
    return {"target": target, "out": out, "base": base, "plain": lora["plain"],
            "peft": {"a": peft_reference(base, a), "b": peft_reference(base, b)}}


def _adapter_path(out: Path, name: str) -> Path:
    return out / read_manifest(out)["target"]["adapters"][name]["file"]


def test_switchable_adapters_validate_and_equal_peft_in_our_runner(switchable: dict[str, Any]) -> None:
    out = switchable["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["status"] == "passed"
    assert {n: p["status"] for n, p in report["parity"]["adapters"].items()} == {"a": "passed", "b": "passed"}
    manifest = read_manifest(out)
    assert manifest["validation"]["adapters"] == {"a": "passed", "b": "passed"}
    assert set(manifest["target"]["adapters"]) == {"a", "b"}
    suffix = {"onnxruntime": ".onnx_adapter", "openvino": ".safetensors"}[switchable["target"]]
    assert _adapter_path(out, "a").suffix == suffix and manifest["target"]["adapters"]["b"]["parameters"] == 12
    _, runner = registry.load_runner(out)
    vocab = manifest["model"]["config"]["vocab_size"]
    prompts = [random_ids(40, vocab, 21), random_ids(26, vocab, 22)]
    # One process, switching back and forth: each run gives its own model's logits.
    for name in ("a", "b", None, "a"):
        runner.set_adapter(None if name is None else registry.adapter_file(out, manifest, name))
        ours = prefill_then_decode(runner, prompts, [9, 4])
        reference = switchable["plain"] if name is None else switchable["peft"][name]
        with torch.no_grad():
            worst = max(float(np.abs(ours[b, :len(p)] - reference(torch.tensor([p])).logits[0].numpy()).max())
                        for b, p in enumerate(prompts))
        print(f"adapter {name}: max abs logit error vs transformers + peft {worst:.2e}")
        assert worst <= TOL
    prompt = prompts[0][:20]
    for name in ("a", "b"):
        gen = cli_run("generate", str(out), "--adapter", name, "--prompt-ids", ",".join(map(str, prompt)),
                      "--max-new-tokens", "12", "--json")
        assert gen.exit_code == 0, gen.output
        assert json.loads(gen.stdout)["token_ids"] == greedy(switchable["peft"][name], prompt, 12)
    one_line_error(cli_run("generate", str(out), "--adapter", "c", "--prompt-ids", "1,2"), "has no adapter 'c'")


@pytest.mark.parametrize("switchable", ["onnxruntime"], indirect=True)
def test_onnxruntime_genai_switches_our_adapters(switchable: dict[str, Any]) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (test extra)")
    out = switchable["out"]
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for name in ("a", "b"):
        adapters.load(str(out / "adapters" / f"{name}.onnx_adapter"), name)
    prompt = random_ids(20, read_manifest(out)["model"]["config"]["vocab_size"], 23)

    def generated(name: str | None) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 12)  # past the window of 16
        generator = og.Generator(model, params)
        if name is not None:
            generator.set_active_adapter(adapters, name)
        generator.append_tokens(prompt)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    runs = {name: generated(name) for name in ("a", None, "b", "a")}
    assert runs["a"] == greedy(switchable["peft"]["a"], prompt, 12)
    assert runs["b"] == greedy(switchable["peft"]["b"], prompt, 12)
    assert runs[None] == greedy(switchable["plain"], prompt, 12)
    assert len({tuple(t) for t in runs.values()}) == 3  # three different models


@pytest.mark.parametrize("switchable", ["openvino"], indirect=True)
def test_openvino_genai_switches_our_adapters(switchable: dict[str, Any]) -> None:
    """OpenVINO GenAI finds each adapted layer by our IR's MatMul names and applies our files at alpha 1."""
    genai = pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (test extra)")
    import openvino as ov

    out = switchable["out"]
    adapters = {name: genai.Adapter(str(_adapter_path(out, name))) for name in ("a", "b")}
    config = genai.AdapterConfig()
    for adapter in adapters.values():
        config.add(adapter, 1.0)
    pipe = genai.LLMPipeline(str(out), "CPU", adapters=config, ATTENTION_BACKEND="SDPA",
                             INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    prompt = random_ids(20, read_manifest(out)["model"]["config"]["vocab_size"], 23)
    ids = np.array([prompt], dtype=np.int64)

    def generated(name: str | None) -> list[int]:
        settings = genai.GenerationConfig(max_new_tokens=12, do_sample=False, ignore_eos=True)
        settings.adapters = genai.AdapterConfig(adapters[name], 1.0) if name else genai.AdapterConfig()
        result = pipe.generate(genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), settings)
        return [int(t) for t in result.tokens[0]]

    runs = {name: generated(name) for name in ("a", None, "b")}
    assert runs["a"] == greedy(switchable["peft"]["a"], prompt, 12)
    assert runs["b"] == greedy(switchable["peft"]["b"], prompt, 12)
    assert runs[None] == greedy(switchable["plain"], prompt, 12)
    assert len({tuple(t) for t in runs.values()}) == 3


def test_swapped_adapter_files_fail_validation(switchable: dict[str, Any], tmp_path: Path) -> None:
    """Planted: the two adapter files swapped and the manifest rehashed; only parity can catch it."""
    from exporter.manifest import write_manifest

    art = tmp_path / "swapped"
    shutil.copytree(switchable["out"], art)
    a, b = _adapter_path(art, "a"), _adapter_path(art, "b")
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    write_manifest(art, read_manifest(art, verify=False))
    result = cli_run("validate", str(art), "--no-latency", "--adapter", "a")
    assert result.exit_code == 3, result.output
    report = json.loads((art / "report.json").read_text())
    assert report["parity"]["adapters"]["a"]["status"] == "failed" and "b" not in report["parity"]["adapters"]
    assert any(f["section"].startswith("adapter a: fidelity") for f in report["parity"]["failures"])
    base_only = cli_run("validate", str(art), "--no-latency", "--adapter", "none")
    assert base_only.exit_code == 0, base_only.output


def test_switchable_adapter_errors(lora: dict[str, Any], tmp_path: Path) -> None:
    base, good = lora["base"], lora["adapter"]  # `good` has modules_to_save: mergeable, not switchable
    linear = make_adapter(base, tmp_path / "linear", seed=9, target_modules=["q_proj"])
    cases = [
        (["--target", "reference", "--adapters", f"x={linear}"], "has no switchable LoRA adapters"),
        (["--target", "onnxruntime", "--precision", "int4", "--adapters", f"x={linear}"], "fp32 only, not int4"),
        (["--target", "onnxruntime", "--adapters", f"x={good}"], "modules_to_save or an embedding LoRA"),
        (["--target", "onnxruntime", "--adapters", f"../x={linear}"], "adapter name '../x'"),
        (["--target", "onnxruntime", "--adapters", f"x={linear},x={linear}"], "names 'x' twice"),
        (["--target", "onnxruntime", "--adapters", str(linear)], "takes name=DIR"),
        (["--target", "onnxruntime", "--adapter", str(linear), "--adapters", f"x={linear}"], "not both"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        one_line_error(cli_run("build", "--checkpoint", str(base), "--out", str(out), *args), needle)
        assert not out.exists()


def test_a_foreign_adapter_file_is_refused(switchable: dict[str, Any], tmp_path: Path) -> None:
    """Planted: an artifact's adapter file replaced by one for other layers (manifest rehashed): exit 2,
    one line, before anything runs with it. A runner not opened by its target cannot switch at all."""
    from exporter.errors import UserError
    from exporter.manifest import write_manifest

    art = tmp_path / "foreign"
    shutil.copytree(switchable["out"], art)
    path = _adapter_path(art, "a")
    foreign = "model.layers.0.self_attn.c_attn"
    if switchable["target"] == "onnxruntime":
        import onnxruntime as ort

        fmt = ort.AdapterFormat()
        fmt.set_parameters({f"{foreign}.lora_A": ort.OrtValue.ortvalue_from_numpy(np.zeros((64, 4), np.float32))})
        fmt.export_adapter(str(path))
        needle = "which is not a LoRA input of this model"
    else:
        save_file({f"base_model.model.{foreign}.lora_A.weight": torch.zeros(4, 64),
                   f"base_model.model.{foreign}.lora_B.weight": torch.zeros(64, 4)}, path)
        needle = "does not fit this IR"
    write_manifest(art, read_manifest(art, verify=False))
    one_line_error(cli_run("generate", str(art), "--adapter", "a", "--prompt-ids", "1,2,3"), needle)
    _, runner = registry.load_runner(art)
    runner.reopen = None
    with pytest.raises(UserError, match="cannot switch adapters"):
        runner.set_adapter(_adapter_path(art, "b"))
