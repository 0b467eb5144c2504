"""Write a sharded safetensors checkpoint of a preset's real dimensions with seeded random weights,
shard by shard, so memory stays bounded by one shard whatever the model size.

    python benchmarks/make_checkpoint.py --preset mistral-7b-v0.1 --dtype bf16 --out /data/m7b
    python benchmarks/make_checkpoint.py --preset mistral-7b-v0.1 --layers 4 --out /data/m1b   # ~1B variant

The folder gets config.json (with `layer_types`, so peers that read it keep the sliding window), the
shards, model.safetensors.index.json, and the preset's real Mistral tokenizer from mistral-common
(tokenizer.model and its tokenizer.json; peers need one), so that text validates as text. A preset
without one gets a word-level tokenizer covering the vocabulary, and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from exporter.checkpoint import DTYPES, PresetWeights, expected_shapes
from exporter.config import MistralConfig, preset


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
         "model_max_length": 32768}))


def write_preset_tokenizer(preset_name: str, vocab_size: int, folder: Path) -> None:
    """The preset's mistral-common tokenizer rather than the word-level one, which maps any real text to
    <unk> (every prompt then reads as the same tokens); word-level only for a preset without one."""
    from exporter.tokenizer import PRESET_TOKENIZERS, packaged, version_of, write_hf_files

    name = PRESET_TOKENIZERS.get(preset_name)
    if name is None:
        print(f"  tokenizer: word-level (preset {preset_name} has no mistral-common tokenizer)", flush=True)
        write_tokenizer(folder, vocab_size)
        return
    info = write_hf_files(packaged(name), folder, version_of(name))
    if info["vocab_size"] != vocab_size:
        raise SystemExit(f"{name} has {info['vocab_size']} tokens, the preset {vocab_size}")
    print(f"  tokenizer: mistral-common {name}", flush=True)


def hf_config(cfg: MistralConfig, dtype: str) -> dict[str, object]:
    raw = cfg.to_hf_dict()
    raw["torch_dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    if cfg.sliding_window:
        raw["layer_types"] = ["sliding_attention"] * cfg.num_hidden_layers
    return raw


def write_checkpoint(cfg: MistralConfig, source: PresetWeights, dtype: str, out: Path, shard_bytes: int,
                     tokenizer_preset: str | None = None) -> int:
    """Shards of at most shard_bytes, and the tokenizer of `tokenizer_preset` (else a word-level one);
    returns the total tensor bytes."""
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    shapes = expected_shapes(cfg)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: source.tensor(name, torch_dtype).contiguous() for name in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in names})
        del tensors
        print(f"  {shard}: {len(names)} tensors", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
    if tokenizer_preset is None:
        write_tokenizer(out, cfg.vocab_size)
    else:
        write_preset_tokenizer(tokenizer_preset, cfg.vocab_size, out)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description="Random sharded Mistral checkpoint of a preset's dimensions.")
    parser.add_argument("--preset", default="mistral-7b-v0.1")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (4 layers of 7B ~ 1.1B)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    source = PresetWeights(args.preset, args.seed)
    source.config = cfg
    start = time.perf_counter()
    total = write_checkpoint(cfg, source, args.dtype, args.out, int(args.shard_gb * 2**30), args.preset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {args.out}: {total / 2**30:.2f} GiB of tensors in {time.perf_counter() - start:.0f} s, "
          f"peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
