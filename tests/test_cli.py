"""The CLI contract: commands, exit codes, one-line errors, whole-or-nothing artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_run as run, hf_model, save_checkpoint, save_tokenizer





def build_tiny(out: Path, *extra: str) -> object:
    return run("build", "--target", "reference", "--out", str(out), "--no-validate", *extra)


def test_build_writes_a_whole_artifact_with_hashes(tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert build_tiny(out).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"program.pt2", "model.safetensors"} <= paths
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"])
    assert manifest["cache"]["capacity"] == 16 and manifest["cache"]["policy"] == "ring"
    assert [i["name"] for i in manifest["io"]["inputs"]][:2] == ["input_ids", "positions"]
    assert manifest["target"] == {"name": "reference", "device": "cpu", "precision": "fp32", "options": {},
                                  "kernels": {"cpu": "mistral_export::cached_attention (torch SDPA)"}}
    assert manifest["tool"]["torch"] and manifest["model"]["source"] == "preset:tiny:seed0"
    assert not list(tmp_path.glob(".*partial*"))


def test_existing_out_is_refused_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert build_tiny(out).exit_code == 0
    result = build_tiny(out)
    assert result.exit_code == 2 and "--force" in result.output
    assert build_tiny(out, "--force").exit_code == 0


@pytest.mark.parametrize("args,needle", [
    (["--target", "nope"], "valid targets: reference"),
    (["--target", "reference", "--preset", "mistral-70b"], "valid presets"),
    (["--target", "reference", "--precision", "int4"], "supported: cpu: fp32, fp16, bf16"),
    (["--target", "reference", "--device", "tpu"], "supported devices: cpu, cuda"),
    (["--target", "reference", "--option", "block_size=32"], "unknown option"),
    (["--target", "reference", "--option", "oops"], "key=value"),
    (["--target", "reference", "--checkpoint", "/nonexistent"], "does not exist"),
    (["--target", "reference", "--checkpoint", ".", "--preset", "tiny"], "not both"),
])
def test_bad_build_input_exits_2_without_traceback(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "a"
    result = run("build", *args, "--out", str(out), "--no-validate")
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_interrupted_or_failing_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from targets.reference import ReferenceTarget

    def boom(self, inp, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ReferenceTarget, "lower", boom)
    out = tmp_path / "a"
    assert build_tiny(out).exit_code == 130
    assert not out.exists() and not list(tmp_path.iterdir())

    def bug(self, inp, out_dir):
        raise RuntimeError("kaput")

    monkeypatch.setattr(ReferenceTarget, "lower", bug)
    result = build_tiny(out)
    assert result.exit_code == 1 and "internal error: RuntimeError: kaput" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())
    monkeypatch.setenv("MISTRAL_EXPORT_DEBUG", "1")
    assert isinstance(build_tiny(out).exception, RuntimeError)


def test_targets_lists_availability() -> None:
    result = run("targets", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["reference"]["available"] and "fp32" in rows["reference"]["precisions"]
    assert run("targets").exit_code == 0


def test_inspect_and_integrity(tmp_path: Path) -> None:
    out = tmp_path / "a"
    build_tiny(out)
    human = run("inspect", str(out))
    assert human.exit_code == 0 and "capacity 16" in human.output
    raw = run("inspect", str(out), "--json")
    assert json.loads(raw.output)["schema_version"] == 1
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run("inspect", str(out))
    assert result.exit_code == 2 and "sha256 differs" in result.output
    weights.write_bytes(bytes(data[:100]))
    result = run("generate", str(out), "--prompt-ids", "1,2")
    assert result.exit_code == 2 and "truncated" in result.output
    assert run("inspect", str(tmp_path)).exit_code == 2


def test_generate_equals_transformers_greedy(tmp_path: Path) -> None:
    model = hf_model(seed=3, sliding_window=4)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "art"
    assert run("build", "--target", "reference", "--checkpoint", str(folder), "--out", str(out),
               "--no-validate").exit_code == 0
    prompt = [5, 17, 33, 2 + 1, 40, 41, 42, 7, 8, 9]
    result = run("generate", str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "24",
                 "--json")
    assert result.exit_code == 0
    ours = json.loads(result.stdout)["token_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    print("ours", ours, "\nhf  ", ref)
    assert ours == ref and len(ours) > 4 + 1  # decodes past the window of 4


def test_generate_with_tokenizer_and_bad_prompts(tmp_path: Path) -> None:
    folder = save_checkpoint(hf_model(), tmp_path / "ckpt")
    save_tokenizer(folder, 96)
    out = tmp_path / "art"
    assert run("build", "--target", "reference", "--checkpoint", str(folder), "--out", str(out),
               "--no-validate").exit_code == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    result = run("generate", str(out), "--prompt", "w1 w2 w3 w4 w5", "--max-new-tokens", "3")
    assert result.exit_code == 0 and "3 new" in result.output
    for bad in (["--prompt-ids", "1,x"], ["--prompt-ids", "1,9999"], [], ["--prompt-ids", "1", "--prompt", "a"],
                ["--prompt", "a", "--system", "s"], ["--prompt", "a", "--chat", "b"]):
        result = run("generate", str(out), *bad)
        assert result.exit_code == 2, bad
