"""Write a seeded random LoRA adapter, in PEFT's file layout, for a checkpoint folder's dimensions.

    python benchmarks/make_adapter.py --checkpoint /data/m1b --rank 16 --out /data/m1b-lora

adapter_config.json (peft_type LORA, every linear layer targeted) and adapter_model.safetensors with PEFT's
key names (base_model.model.<module>.lora_A.weight [r, in], lora_B.weight [out, r]). The tests make their
adapters with peft itself; this writes one of any size without loading the base model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from exporter.checkpoint import expected_shapes
from exporter.config import load_config

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(checkpoint: Path, out: Path, rank: int, alpha: float, seed: int = 0) -> Path:
    shapes = expected_shapes(load_config(checkpoint))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in ((n, s) for n, s in shapes.items() if n.rsplit(".", 2)[-2] in LINEAR):
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = (torch.randn(rank, cols, generator=gen) / cols ** 0.5).to(torch.bfloat16)
        tensors[f"{module}.lora_B.weight"] = (0.01 * torch.randn(rows, rank, generator=gen)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "target_modules": list(LINEAR),
        "bias": "none", "use_rslora": False, "use_dora": False, "base_model_name_or_path": str(checkpoint)}, indent=2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    args = parser.parse_args()
    write_adapter(args.checkpoint, args.out, args.rank, args.alpha)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
