"""Lower the canonical program to a stateful, multifunction Core ML mlpackage.

Core ML state is a model buffer updated in place, while the canonical program takes its caches as
inputs and returns them. A thin wrapper module therefore holds one fp16 buffer per layer and K/V,
calls the (decomposed) program's own graph module and copies the new caches back; torch.export of that
wrapper is what coremltools converts. The wrapper re-traces only the exported graph, never the eager
model, and adds no math besides the fp16 casts that Core ML's state type requires.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exporter.attention import decompose
from exporter.config import MistralConfig
from exporter.trace import bind
from targets.base import LowerInput

MODEL_FILE = "model.mlpackage"
FUNCTIONS = {"prefill": None, "decode": 1}  # chunk length per function; None = the cache capacity


def quiet_coremltools() -> Any:
    """Import coremltools without its start-up chatter about untested torch and missing macOS libs,
    and without its per-pass progress bars (our own progress bar reports the conversion)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import coremltools

    return coremltools


def state_name(kind: str, layer: int) -> str:
    return f"{kind}_cache_{layer}"


class StatefulWrapper(nn.Module):
    """Holds the KV caches as fp16 buffers (Core ML states) around the canonical graph."""

    def __init__(self, graph: nn.Module, cfg: MistralConfig, capacity: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.canonical = graph
        self.dtype = dtype
        self.layers = cfg.num_hidden_layers
        shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        for i in range(self.layers):
            self.register_buffer(state_name("k", i), torch.zeros(shape, dtype=torch.float16))
            self.register_buffer(state_name("v", i), torch.zeros(shape, dtype=torch.float16))

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        ks = [getattr(self, state_name("k", i)).to(self.dtype) for i in range(self.layers)]
        vs = [getattr(self, state_name("v", i)).to(self.dtype) for i in range(self.layers)]
        logits, new_k, new_v = self.canonical(input_ids, positions, ks, vs)
        for i in range(self.layers):
            getattr(self, state_name("k", i)).copy_(new_k[i].half())
            getattr(self, state_name("v", i)).copy_(new_v[i].half())
        return logits


def _convert(wrapper: StatefulWrapper, chunk: int, precision: str, target: str) -> Any:
    ct = quiet_coremltools()
    example = (torch.zeros(1, chunk, dtype=torch.long), torch.arange(chunk).unsqueeze(0))
    program = torch.export.export(wrapper, example).run_decompositions({})
    # canonicalize_inplace_pattern only reorders state writes, and it trips over the multi-state
    # update pattern in coremltools 9.0 (a KeyError on a removed op); the program is the same without it.
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::canonicalize_inplace_pattern"})
    compute = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                      compute_precision=compute, outputs=[ct.TensorType(name="logits")],
                      pass_pipeline=pipeline, skip_model_load=True)


def lower_to_mlpackage(inp: LowerInput, out: Path, compress: Any) -> dict[str, Any]:
    """Write out/model.mlpackage with `prefill` and `decode` functions sharing one weight file."""
    ct = quiet_coremltools()
    program = inp.program()
    names = list(program.state_dict)
    # coremltools needs every weight in the torch program: this is the one full copy (documented),
    # in the traced dtype (fp16 unless the precision is fp32).
    bind(program, inp.weight)
    dtype = next(iter(program.state_dict.values())).dtype
    graph = decompose(program, expand_gqa=True).module()
    wrapper = StatefulWrapper(graph, inp.config, inp.capacity, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        descriptor = ct.utils.MultiFunctionDescriptor()
        for i, (function, chunk) in enumerate(FUNCTIONS.items()):
            inp.progress(f"coreml: converting {function}", i / (len(FUNCTIONS) + 1))
            model = compress(_convert(wrapper, chunk or inp.capacity, inp.precision,
                                      inp.options.deployment_target))
            path = Path(tmp) / f"{function}.mlpackage"
            model.save(str(path))
            del model  # the next conversion should not stack on this one's weight copies
            gc.collect()
            descriptor.add_function(str(path), src_function_name="main", target_function_name=function)
        descriptor.default_function_name = "decode"
        inp.progress("coreml: merging functions", len(FUNCTIONS) / (len(FUNCTIONS) + 1))
        ct.utils.save_multifunction(descriptor, str(out / MODEL_FILE))
    shutil.rmtree(Path(tmp), ignore_errors=True)
    return {"functions": {f: {"chunk": c or inp.capacity} for f, c in FUNCTIONS.items()}, "weights": len(names)}
