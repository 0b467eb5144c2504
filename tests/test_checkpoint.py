"""Loading local HF folders: single file, sharded, strict keys, dtypes, hashes; presets stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.checkpoint import CheckpointFolder, PresetWeights
from exporter.sources import open_source
from exporter.errors import CheckpointError, ConfigError
from tests.conftest import hf_model, save_checkpoint, save_tokenizer


def test_single_file_matches_and_converts_dtype(tmp_path) -> None:
    model = hf_model()
    src = CheckpointFolder(save_checkpoint(model, tmp_path / "ckpt"))
    state = model.state_dict()
    for name, tensor in src.tensors(torch.float32):
        assert torch.equal(tensor, state[name])
    assert src.tensor("lm_head.weight", torch.bfloat16).dtype == torch.bfloat16
    records = {r.path for r in src.file_records()}
    assert {"config.json", "model.safetensors"} <= records
    assert all(len(r.sha256) == 64 for r in src.file_records())


def test_sharded_index_and_missing_shard(tmp_path) -> None:
    model = hf_model()
    folder = save_checkpoint(model, tmp_path / "ckpt", shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    src = CheckpointFolder(folder)
    assert torch.equal(src.tensor("model.norm.weight", torch.float32), model.state_dict()["model.norm.weight"])
    (folder / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"(?s)missing.*{shards[-1]}"):
        CheckpointFolder(folder)


def test_strict_keys_list_every_problem_in_one_error(tmp_path) -> None:
    folder = save_checkpoint(hf_model(), tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(31)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        CheckpointFolder(folder)
    text = str(info.value)
    assert "missing tensors (1)" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected tensors (1)" in text and "model.layers.0.extra.weight" in text
    assert "wrong-shape tensors (1)" in text and "model.norm.weight: file (31,), config expects (32,)" in text


def test_wrong_dtype_and_missing_files(tmp_path) -> None:
    folder = save_checkpoint(hf_model(), tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="(?s)non-float tensors.*model.norm.weight: I32"):
        CheckpointFolder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointFolder(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointFolder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="config.json"):
        CheckpointFolder(tmp_path)


def test_tokenizer_detected(tmp_path) -> None:
    folder = save_checkpoint(hf_model(), tmp_path / "ckpt")
    assert CheckpointFolder(folder).tokenizer_dir is None
    save_tokenizer(folder, 96)
    src = CheckpointFolder(folder)
    assert src.tokenizer_dir == folder
    assert "tokenizer.json" in {r.path for r in src.file_records()}


def test_preset_is_seeded_and_streams() -> None:
    a, b = PresetWeights("tiny"), PresetWeights("tiny")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.tensor(name, torch.float32), b.tensor(name, torch.float32))
    assert not torch.equal(a.tensor(name, torch.float32), PresetWeights("tiny", seed=1).tensor(name, torch.float32))
    assert open_source(None, None).name == "tiny"
    with pytest.raises(CheckpointError, match="not both"):
        open_source(Path("."), "tiny")


@pytest.mark.parametrize("tied", [False, True])
def test_rows_read_slices_in_the_stored_dtype(tmp_path, tied: bool) -> None:
    """Block-by-block reads (targets that convert per block) equal slices of the whole tensor, keep
    the stored dtype, and resolve a tied lm_head to the embedding."""
    model = hf_model(tie_word_embeddings=tied).to(torch.bfloat16)
    src = CheckpointFolder(save_checkpoint(model, tmp_path / "ckpt", shard_size="20KB"))
    rows = src.rows("lm_head.weight")
    whole = src.parameter("lm_head.weight", None)
    assert rows.shape == tuple(whole.shape) and whole.dtype == torch.bfloat16
    blocks = [rows[r:r + 100] for r in range(0, rows.shape[0], 100)]
    assert all(b.dtype == torch.bfloat16 for b in blocks)
    assert torch.equal(torch.cat(blocks), whole)
    assert torch.equal(whole, model.state_dict()["model.embed_tokens.weight" if tied else "lm_head.weight"])
