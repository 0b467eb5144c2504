"""Hostile or broken inputs: manifests whose paths escape, malformed manifests, checkpoints and
configs. Each is exit 2 with one plain line naming the file or field, and nothing outside is read."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.checkpoint import finite, sha256_file
from exporter.errors import CheckpointError
from exporter.manifest import read_manifest, write_manifest
from tests.conftest import cli_run as run, TINY_HF, hf_model, save_checkpoint, write_config





def refused(result: Any, needle: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], lines
    assert "Traceback" not in result.output and len([ln for ln in lines if ln.startswith("error")]) == 1


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "ref"
    assert run("build", "--target", "reference", "--out", str(out), "--no-validate").exit_code == 0
    return out


def copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "a"))


def edit_manifest(folder: Path, change: Any) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("path,needle", [("../../etc/passwd", "leaves the artifact"),
                                         ("/etc/hostname", "leaves the artifact"),
                                         ("./model.safetensors", "leaves the artifact"),
                                         ("a\\..\\..\\x", "not a plain relative path")])
def test_manifest_paths_that_escape_are_refused(artifact: Path, tmp_path: Path, path: str, needle: str) -> None:
    folder = copy(artifact, tmp_path)
    outside = Path("/etc/passwd")

    def add(m: dict) -> None:
        m["files"].append({"path": path, "bytes": outside.stat().st_size, "sha256": sha256_file(outside)})

    edit_manifest(folder, add)
    for command in (["inspect", str(folder)], ["generate", str(folder), "--prompt-ids", "1,2"]):
        result = run(*command)
        refused(result, needle)
        assert str(outside.stat().st_size) not in result.output  # nothing about the outside file leaks


def test_symlinked_model_file_is_refused(artifact: Path, tmp_path: Path) -> None:
    folder = copy(artifact, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    (folder / "model.safetensors").symlink_to(outside)  # same bytes, so only the link can tell
    refused(run("generate", str(folder), "--prompt-ids", "1,2"), "model.safetensors is a symbolic link")


@pytest.mark.parametrize("case,needle", [
    ("empty", "manifest.files is empty"),
    ("unlisted", "holds extra.bin, which its manifest does not list"),
    ("no-sha", "manifest.files[model.safetensors] has no sha256"),
    ("no-files", "manifest.files is missing"),
    ("no-target", "manifest.target is missing"),
    ("no-capacity", "manifest.cache.capacity is missing"),
    ("no-config", "manifest.model.config is missing"),
    ("bad-config", "manifest.model.config is not a valid config"),
    ("list", "is not a JSON object"),
    ("not-utf8", "is not UTF-8"),
])
def test_malformed_manifests_are_refused(artifact: Path, tmp_path: Path, case: str, needle: str) -> None:
    folder = copy(artifact, tmp_path)
    edits = {
        "empty": lambda m: m.update(files=[]),
        "no-sha": lambda m: [f.pop("sha256") for f in m["files"] if f["path"] == "model.safetensors"],
        "no-files": lambda m: m.pop("files"),
        "no-target": lambda m: m.pop("target"),
        "no-capacity": lambda m: m["cache"].pop("capacity"),
        "no-config": lambda m: m["model"].pop("config"),
        "bad-config": lambda m: m["model"]["config"].update(hidden_size="abc"),
    }
    if case in edits:
        edit_manifest(folder, edits[case])
    elif case == "unlisted":
        (folder / "extra.bin").write_bytes(b"\0")
    elif case == "list":
        (folder / "manifest.json").write_text("[1, 2]")
    else:
        (folder / "manifest.json").write_bytes(b"\xff\xfe{}")
    refused(run("inspect", str(folder)), needle)


def test_manifest_named_model_and_tokenizer_paths_stay_inside(artifact: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed")
    folder = copy(artifact, tmp_path)
    for model_file in ("/etc/hostname", "../ref/model.safetensors"):
        edit_manifest(folder, lambda m: m["target"].update(name="openvino", model_file=model_file, layout="concat",
                                                          runtime_hints={}))
        write_manifest(folder, read_manifest(folder, verify=False))
        refused(run("generate", str(folder), "--prompt-ids", "1,2"), "leaves the artifact")
    folder2 = copy(artifact, tmp_path / "t")
    edit_manifest(folder2, lambda m: m["model"].update(tokenizer="../../tokenizer"))
    write_manifest(folder2, read_manifest(folder2, verify=False))
    refused(run("generate", str(folder2), "--prompt", "hello"), "leaves the artifact")


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(hf_model(), tmp_path / "ckpt")


def build_from(folder: Path, tmp_path: Path, *extra: str) -> Any:
    return run("build", "--target", "reference", "--checkpoint", str(folder), "--out", str(tmp_path / "out"),
               "--no-validate", *extra)


def refused_build(folder: Path, tmp_path: Path, needle: str) -> None:
    """Refused with one line, and nothing at --out or beside it (no staging folder, no lock)."""
    refused(build_from(folder, tmp_path), needle)
    assert not [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out")]


@pytest.mark.parametrize("damage,needle", [("truncated-header", "header too small"),
                                           ("huge-header", "header too large"),
                                           ("past-the-end", "not fully covered")])
def test_broken_safetensors_name_the_file(ckpt: Path, tmp_path: Path, damage: str, needle: str) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated-header": data[:5], "huge-header": struct.pack("<Q", 1 << 40) + data[8:],
                      "past-the-end": data[:-8]}[damage])
    result = build_from(ckpt, tmp_path)
    refused(result, str(path))
    assert needle in result.output and not (tmp_path / "out").exists()


@pytest.fixture()
def sharded(tmp_path: Path) -> Path:
    return save_checkpoint(hf_model(), tmp_path / "sharded", shard_size="20KB")


@pytest.mark.parametrize("damage,needle", [
    ("omit", "does not list"), ("wrong-shard", "which does not hold it"), ("non-string", "not shard file names"),
    ("no-map", "has no weight_map"), ("not-json", "is not valid JSON"), ("dotdot", "which is not a file of"),
    ("absolute", "which is not a file of")])
def test_broken_index_is_refused(sharded: Path, tmp_path: Path, damage: str, needle: str) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = sorted(index["weight_map"])
    shards = sorted(set(index["weight_map"].values()))
    outside = tmp_path / "x.safetensors"
    shutil.copy(sharded / shards[0], outside)
    if damage == "omit":  # a tensor whose shard still holds others, so the shard itself is read
        index["weight_map"].pop(next(n for n in names if list(index["weight_map"].values()).count(
            index["weight_map"][n]) > 1))
    elif damage == "wrong-shard":
        index["weight_map"][names[0]] = next(s for s in shards if s != index["weight_map"][names[0]])
    elif damage == "non-string":
        index["weight_map"][names[0]] = 7
    elif damage == "no-map":
        index.pop("weight_map")
    elif damage in ("dotdot", "absolute"):
        for name, shard in index["weight_map"].items():
            if shard == shards[0]:
                index["weight_map"][name] = "../x.safetensors" if damage == "dotdot" else str(outside)
    index_path.write_text("{oops" if damage == "not-json" else json.dumps(index))
    refused_build(sharded, tmp_path, needle)


@pytest.mark.parametrize("patch,needle", [
    ({"hidden_size": "abc"}, "'hidden_size' must be an integer"),
    ({"hidden_size": [32]}, "'hidden_size' must be an integer"),
    ({"hidden_size": None}, "'hidden_size' must be an integer"),
    ({"rope_parameters": "default"}, "'rope_parameters' must be an object"),
    ({"sliding_window": 1}, "'sliding_window' must be an integer of at least 2"),
    ({"sliding_window": True}, "'sliding_window' must be an integer of at least 2"),
    ({"head_dim": 8.5}, "'head_dim' must be an integer"),
    ({"rope_theta": 0}, "'rope_theta' must be a positive number"),
    ({"rope_theta": -5.0}, "'rope_theta' must be a positive number"),
    ({"eos_token_id": 96}, "'eos_token_id' must be a token id in [0, 96)"),
    ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
])
def test_config_fields_of_the_wrong_type(tmp_path: Path, patch: dict, needle: str) -> None:
    folder = write_config(tmp_path / "c", {**TINY_HF, "model_type": "mistral", **patch})
    refused_build(folder, tmp_path, needle)


def test_config_that_is_not_an_object(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2, 3]")
    refused_build(folder, tmp_path, "must hold a JSON object")


def test_strict_boolean_options_and_plain_text_errors(tmp_path: Path) -> None:
    refused(run("build", "--target", "onnxruntime", "--option", "pack_qkv=ture", "--out", str(tmp_path / "o")),
            "option pack_qkv='ture' is not a boolean; use true or false")
    odd = tmp_path / "models[/]v1" / "[red]x"
    refused(run("build", "--target", "reference", "--checkpoint", str(odd), "--out", str(tmp_path / "o")),
            f"checkpoint folder {odd} does not exist")


@pytest.mark.parametrize("target", ["reference", "onnxruntime"])
def test_non_finite_weights_are_reported_at_load(ckpt: Path, tmp_path: Path, target: str) -> None:
    if target == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run("build", "--target", target, "--checkpoint", str(ckpt), "--out", str(out), "--no-validate")
    refused(result, "tensor model.layers.1.mlp.up_proj.weight in")
    assert "NaN/Inf" in result.output and not out.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def _strict(text: str) -> Any:
    def reject(token: str) -> None:
        raise ValueError(f"non-JSON constant {token}")
    return json.loads(text, parse_constant=reject)


def test_reports_and_manifest_stay_strict_json(artifact: Path, tmp_path: Path) -> None:
    folder = copy(artifact, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"][0] = float("inf")  # the artifact then computes non-finite logits
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    write_manifest(folder, read_manifest(folder, verify=False))
    result = run("validate", str(folder), "--no-latency")
    assert result.exit_code == 3
    report = _strict((folder / "report.json").read_text())
    manifest = _strict((folder / "manifest.json").read_text())
    assert report["parity"]["status"] == "failed" and manifest["validation"]["status"] == "failed"


def test_huge_positions_and_contexts_never_allocate(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from targets.onnxruntime.lower import MAX_ROTARY_ROWS

    windowed = save_checkpoint(hf_model(head_dim=16, max_position_embeddings=10**9), tmp_path / "w")
    out = tmp_path / "ort"
    assert run("build", "--target", "onnxruntime", "--checkpoint", str(windowed), "--out", str(out),
               "--no-validate").exit_code == 0
    assert read_manifest(out)["target"]["rotary_positions"] == MAX_ROTARY_ROWS
    assert run("generate", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "3").exit_code == 0
    unwindowed = save_checkpoint(hf_model(sliding_window=None, max_position_embeddings=10**9), tmp_path / "n")
    big = tmp_path / "big"
    result = run("build", "--target", "reference", "--checkpoint", str(unwindowed), "--max-context",
                 str(10**8), "--out", str(big), "--json")
    assert result.exit_code == 0
    validation = json.loads(result.stdout)["validation"]
    assert validation["status"] == "not-run" and "GiB of KV cache" in validation["reason"]
    refused(run("generate", str(big), "--prompt-ids", "1,2"), "GiB of KV cache")
    small = save_checkpoint(hf_model(sliding_window=None), tmp_path / "s")
    refused(run("build", "--target", "reference", "--checkpoint", str(small), "--max-context", "100000",
                "--out", str(tmp_path / "y")), "exceeds the model's max_position_embeddings (256)")


def test_tied_config_with_a_stored_lm_head_matches_transformers(tmp_path: Path) -> None:
    from transformers import MistralForCausalLM

    folder = save_checkpoint(hf_model(seed=5, tie_word_embeddings=True), tmp_path / "tied")
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"]) / 8
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    reference = MistralForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(reference.lm_head.weight, state["lm_head.weight"])  # transformers keeps the stored one
    out = tmp_path / "art"
    assert run("build", "--target", "reference", "--checkpoint", str(folder), "--out", str(out),
               "--no-validate").exit_code == 0
    prompt = [5, 9, 14, 3, 7, 22, 41, 8]
    ours = json.loads(run("generate", str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
                          "10", "--json").stdout)["token_ids"]
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
    print("ours", ours, "transformers", theirs)
    assert ours == theirs and read_manifest(out)["model"]["config"]["tie_word_embeddings"] is False


def test_a_tokenizer_file_linked_out_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """Tokenizer files are copied into the artifact byte for byte: a link to another file would ship it."""
    from tests.conftest import save_tokenizer

    folder = save_checkpoint(hf_model(), tmp_path / "ckpt")
    save_tokenizer(folder, 96)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the checkpoint's")
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to(secret)
    out = tmp_path / "out"
    refused(run("build", "--target", "reference", "--checkpoint", str(folder), "--out", str(out), "--no-validate"),
            "outside the checkpoint")
    assert not out.exists()
    # A link that stays inside the folder is the checkpoint's own file.
    (folder / "tokenizer_config.json").unlink()
    (folder / "copy.json").write_text("{}")
    (folder / "tokenizer_config.json").symlink_to("copy.json")
    assert run("build", "--target", "reference", "--checkpoint", str(folder), "--out", str(out),
               "--no-validate").exit_code == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_anywhere_is_refused(dtype: torch.dtype, bad: float) -> None:
    clean = torch.randn(4099, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert finite("w", clean, "f") is clean
    for position in (0, 1, 2048, 4098):
        tensor = clean.clone()
        tensor[position] = bad
        with pytest.raises(CheckpointError, match="holds 1 NaN/Inf"):
            finite("w", tensor, "f")
