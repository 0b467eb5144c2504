"""Mistral's own download format and hub ids from the local cache, each built and compared with
transformers on the same weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from exporter.manifest import read_manifest
from targets.registry import load_runner
from tests.conftest import (
    TINY_HF,
    check_against_transformers,
    cli_build,
    cli_run,
    hf_model,
    one_line_error,
    random_ids,
    save_checkpoint,
)

PARAMS = dict(dim=TINY_HF["hidden_size"], n_layers=TINY_HF["num_hidden_layers"], head_dim=8,
              hidden_dim=TINY_HF["intermediate_size"], n_heads=TINY_HF["num_attention_heads"],
              n_kv_heads=TINY_HF["num_key_value_heads"], norm_eps=1e-5, vocab_size=TINY_HF["vocab_size"],
              sliding_window=TINY_HF["sliding_window"], rope_theta=10000.0, max_seq_len=256)


def consolidated_weights(seed: int = 0, **params: Any) -> dict[str, torch.Tensor]:
    """Random weights in mistral-inference naming and layout (norms away from 1)."""
    p, gen = {**PARAMS, **params}, torch.Generator().manual_seed(seed)
    q, kv = p["n_heads"] * p["head_dim"], p["n_kv_heads"] * p["head_dim"]
    shapes = {"tok_embeddings.weight": (p["vocab_size"], p["dim"]), "norm.weight": (p["dim"],),
              "output.weight": (p["vocab_size"], p["dim"])}
    for i in range(p["n_layers"]):
        shapes |= {f"layers.{i}.attention_norm.weight": (p["dim"],), f"layers.{i}.ffn_norm.weight": (p["dim"],),
                   f"layers.{i}.attention.wq.weight": (q, p["dim"]), f"layers.{i}.attention.wk.weight": (kv, p["dim"]),
                   f"layers.{i}.attention.wv.weight": (kv, p["dim"]), f"layers.{i}.attention.wo.weight": (p["dim"], q),
                   f"layers.{i}.feed_forward.w1.weight": (p["hidden_dim"], p["dim"]),
                   f"layers.{i}.feed_forward.w2.weight": (p["dim"], p["hidden_dim"]),
                   f"layers.{i}.feed_forward.w3.weight": (p["hidden_dim"], p["dim"])}
    return {name: (1 + 0.1 * torch.randn(shape, generator=gen)) if name.endswith("norm.weight")
            else torch.randn(shape, generator=gen) / shape[-1] ** 0.5 for name, shape in shapes.items()}


def transformers_from_consolidated(weights: dict[str, torch.Tensor]) -> Any:
    """The same weights through transformers' own conversion (convert_mistral_weights_to_hf.py): its
    key table, and its permute for RoPE, view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2)."""
    from transformers import MistralConfig, MistralForCausalLM

    p = PARAMS
    cfg = MistralConfig(hidden_size=p["dim"], num_hidden_layers=p["n_layers"], intermediate_size=p["hidden_dim"],
                        num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"], head_dim=p["head_dim"],
                        rms_norm_eps=p["norm_eps"], vocab_size=p["vocab_size"], sliding_window=p["sliding_window"],
                        rope_theta=p["rope_theta"], max_position_embeddings=p["max_seq_len"])
    cfg._attn_implementation = "eager"

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.view(heads, t.shape[0] // heads // 2, 2, t.shape[1]).transpose(1, 2).reshape(t.shape)

    table = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
    state = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"],
             "lm_head.weight": weights["output.weight"]}
    for key, t in weights.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            module = rest.removesuffix(".weight")
            if module == "attention.wq":
                t = permute(t, p["n_heads"])
            elif module == "attention.wk":
                t = permute(t, p["n_kv_heads"])
            state[f"model.layers.{i}.{table[module]}.weight"] = t
    model = MistralForCausalLM(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def write_consolidated(folder: Path, weights: dict[str, torch.Tensor], **params: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "consolidated.safetensors")
    (folder / "params.json").write_text(json.dumps({**PARAMS, **params}))
    return folder


def compare(artifact: Path, model: Any, label: str) -> None:
    """Artifact logits against transformers: prefill then decode past the window, batch 2 ragged."""
    _, runner = load_runner(artifact)
    prompts = [random_ids(33, PARAMS["vocab_size"], 2), random_ids(21, PARAMS["vocab_size"], 3)]
    check_against_transformers(model, runner, prompts, [10, 3], label)


def test_consolidated_folder_builds_and_matches_transformers(tmp_path: Path) -> None:
    weights = consolidated_weights()
    folder = write_consolidated(tmp_path / "Mistral-tiny", weights)
    out = tmp_path / "art"
    result = cli_build("reference", out, "--checkpoint", str(folder))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["model"]["format"] == "mistral-consolidated" and manifest["model"]["name"] == "Mistral-tiny"
    assert {f["path"] for f in manifest["model"]["checkpoint_files"]} == {"params.json", "consolidated.safetensors"}
    compare(out, transformers_from_consolidated(weights), "consolidated format")


def test_a_missing_rotary_reorder_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted defect: q/k read without the interleaved-to-halves reorder. transformers' conversion
    then disagrees, so the comparison above can fail."""
    from exporter import consolidated

    monkeypatch.setattr(consolidated, "interleaved_to_halves", lambda weight, heads: weight)
    weights = consolidated_weights()
    out = tmp_path / "art"
    assert cli_build("reference", out, "--checkpoint", str(write_consolidated(tmp_path / "c", weights)),
                     "--no-validate", "--no-cache").exit_code == 0
    with pytest.raises(AssertionError):
        compare(out, transformers_from_consolidated(weights), "without the reorder")


@pytest.mark.parametrize("change,needle", [
    ({"rope_theta": None}, "lacks rope_theta; add it"),
    ({"moe": {"num_experts": 8}}, "only dense Mistral models"),
    ({"sliding_window": [4, 8]}, "per-layer sliding windows"),
    ({"n_heads": "four"}, "num_attention_heads"),
    ({"dim": None}, "lacks the required field(s) ['dim']"),
])
def test_bad_params_json_is_refused(tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    params = {k: v for k, v in {**PARAMS, **change}.items() if v is not None}
    folder = tmp_path / "c"
    folder.mkdir()
    save_file(consolidated_weights(), folder / "consolidated.safetensors")
    (folder / "params.json").write_text(json.dumps(params))
    one_line_error(cli_build("reference", tmp_path / "art", "--checkpoint", str(folder)), needle)
    assert not (tmp_path / "art").exists()


def test_pickled_consolidated_weights_are_refused(tmp_path: Path) -> None:
    folder = write_consolidated(tmp_path / "c", consolidated_weights())
    (folder / "consolidated.safetensors").rename(folder / "consolidated.00.pth")
    one_line_error(cli_build("reference", tmp_path / "art", "--checkpoint", str(folder)),
                   "consolidated.00.pth is a pickle, which is never loaded")


def hub_layout(cache: Path, repo: str, source: Path, revision: str = "a" * 40) -> None:
    """huggingface_hub's cache layout: blobs by hash, snapshots/<sha> of symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = root / "blobs" / f"{i:064x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_id_resolves_in_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = hf_model()
    hub_layout(tmp_path / "hub", "acme/tiny-mistral", save_checkpoint(model, tmp_path / "saved"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    out = tmp_path / "art"
    result = cli_build("reference", out, "--checkpoint", "acme/tiny-mistral")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["model"]["hub_id"] == "acme/tiny-mistral" and manifest["model"]["name"] == "tiny-mistral"
    assert manifest["model"]["path"].endswith("snapshots/" + "a" * 40)
    compare(out, model, "hub id from the local cache")

    missing = cli_build("reference", tmp_path / "none", "--checkpoint", "acme/absent")
    one_line_error(missing, str(tmp_path / "hub"))
    assert "hf download acme/absent" in missing.output and not (tmp_path / "none").exists()


def test_consolidated_weights_beside_a_config_json_say_what_to_do(tmp_path: Path) -> None:
    """Hub repos of Mistral hold both layouts; with only the consolidated weights downloaded, the HF
    config.json decides the format, and the error says how to proceed."""
    folder = write_consolidated(tmp_path / "c", consolidated_weights())
    save_checkpoint(hf_model(), tmp_path / "hf")
    (folder / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    one_line_error(cli_build("reference", tmp_path / "art", "--checkpoint", str(folder)),
                   "holds Mistral's consolidated.safetensors beside a config.json")


def test_a_tensor_outside_mistral_naming_is_refused_not_merged(tmp_path: Path) -> None:
    """`model.norm.weight` beside `norm.weight` is not a second name for one tensor: it is unexpected."""
    weights = consolidated_weights()
    weights["model.norm.weight"] = torch.zeros(PARAMS["dim"])
    folder = write_consolidated(tmp_path / "c", weights)
    one_line_error(cli_build("reference", tmp_path / "art", "--checkpoint", str(folder)),
                   "unexpected tensors (1): model.norm.weight (not a mistral-inference name)")


def test_consolidated_folder_carries_its_v3_tokenizer(tmp_path: Path) -> None:
    from exporter.tokenizer import packaged

    v3 = packaged("mistral_instruct_tokenizer_240323.model.v3")
    folder = write_consolidated(tmp_path / "Mistral-v3", consolidated_weights(vocab_size=32768), vocab_size=32768)
    (folder / "tokenizer.model.v3").write_bytes(v3.read_bytes())
    out = tmp_path / "art"
    result = cli_build("reference", out, "--checkpoint", str(folder), "--no-validate")
    assert result.exit_code == 0, result.output
    info = read_manifest(out)["model"]["tokenizer_info"]
    assert info["instruct_version"] == "v3" and info["mistral_common_file"] == v3.name
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == v3.read_bytes()
    chat = cli_run("generate", str(out), "--chat", "Bonjour", "--system", "Réponds en français.",
                   "--max-new-tokens", "3", "--json")
    assert chat.exit_code == 0 and json.loads(chat.stdout)["prompt_from"] == "mistral-common instruct v3"
    # The same tokenizer beside a model with fewer ids is refused, not carried.
    small = write_consolidated(tmp_path / "small", consolidated_weights())
    (small / "tokenizer.model.v3").write_bytes(v3.read_bytes())
    one_line_error(cli_build("reference", tmp_path / "art2", "--checkpoint", str(small), "--no-validate"),
                   "the tokenizer has 32768 ids but the model only 96")
    assert not (tmp_path / "art2").exists()
