"""TensorRT target: an engine with prefill and decode optimization profiles and native attention.

Attention path: ONNX opset-23 `Attention` nodes with a single output, which the TensorRT ONNX parser
maps to `IAttention` (TensorRT >= 10.14), rather than building the network by hand with
`add_attention` + `add_kv_cache_update` (TensorRT 11.4). Why: one ONNX then serves three purposes:
the engine build, `trtexec`, and an ONNX Runtime run of the very same graph on every CI machine
(level `onnx-proxy`), which the network-API path could not offer where TensorRT is absent.

KV cache: explicit `past_*` inputs and `present_*` outputs in BNSH with the ring write as a scatter.
The runner keeps two device buffers per cache and swaps them each step, so the cache stays on the GPU
with no copy; a true single-buffer in-place update needs the network API's KV-cache-update layer.

Where `tensorrt` is not importable or no CUDA GPU exists, `--onnx-only` writes the engine-ready ONNX,
the profiles and a `build_engine.sh` (the exact trtexec line) and validates the ONNX in ONNX Runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.contract import cache_contract, canonical_io
from exporter.errors import NotMeasurable, UserError
from targets.base import LowerInput, Lowered, check_supported
from targets.resources import ExportMemory

PLAN_FILE = "engine_plan.json"
SCRIPT_FILE = "build_engine.sh"


@dataclass(frozen=True)
class TensorRTOptions:
    """Batch range of the profiles, builder optimization level (0-5), timing cache file, ONNX only."""

    onnx_only: bool = False
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    optimization_level: int = 3
    timing_cache: str = ""


def _tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("tensorrt is not importable (its wheels fetch NVIDIA's libraries from NVIDIA's own index); "
                "use --onnx-only to write the engine-ready ONNX and the trtexec build plan")
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch; use --onnx-only to write the ONNX and the build plan"
    return None


class TensorRTTarget:
    """ONNX (opset-23 Attention) -> TensorRT engine with prefill/decode profiles."""

    name = "tensorrt"
    devices = ("cuda",)
    precisions = ("fp16", "bf16", "fp32")
    options_type = TensorRTOptions
    runtime_packages = ("tensorrt", "onnx", "onnxruntime")
    # The ONNX streams as for ONNX Runtime (1.11 GiB at 7B); the engine builder reads the weights whole
    # (declared, not measured here: no TensorRT on these machines).
    export_memory = ExportMemory(output_factor=1.0, tensors_in_flight=2)

    def job_resource(self, device: str, options: TensorRTOptions) -> str | None:
        """An engine is built on the GPU it runs on; --onnx-only runs anywhere."""
        return None if options.onnx_only else "GPU"

    def check_available(self) -> str | None:
        return _tensorrt_reason()

    def availability_for(self, options: TensorRTOptions) -> str | None:
        """--onnx-only needs only the ONNX exporter (and ONNX Runtime for the proxy check)."""
        if not options.onnx_only:
            return _tensorrt_reason()
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            return "onnx and onnxscript are needed to write the ONNX (pip install 'mistral-export[tensorrt]')"
        return None

    def kernels(self) -> dict[str, str]:
        return {f"cuda/{p}": "IAttention (from ONNX opset-23 Attention)" for p in self.precisions}

    @staticmethod
    def check_options(options: TensorRTOptions, capacity: int) -> None:
        if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
            raise UserError(f"batch range must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                            f"{options.min_batch}/{options.opt_batch}/{options.max_batch}")
        if not 0 <= options.optimization_level <= 5:
            raise UserError(f"optimization_level must be 0..5, got {options.optimization_level}")

    def lower(self, inp: LowerInput, out_dir: Path) -> Lowered:
        from targets.tensorrt.onnx_graph import MODEL_FILE, export_onnx
        from targets.tensorrt.plan import build_script, profiles, trtexec_command

        check_supported(self, inp.device, inp.precision)
        opts: TensorRTOptions = inp.options
        self.check_options(opts, inp.capacity)
        cfg = inp.config
        onnx_path = export_onnx(inp, out_dir)
        plans = profiles(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, inp.capacity,
                         opts.min_batch, opts.opt_batch, opts.max_batch)
        command = trtexec_command(MODEL_FILE, "engine.plan", plans, opts.optimization_level,
                                  opts.timing_cache or None)
        (out_dir / PLAN_FILE).write_text(json.dumps({"profiles": [p.to_dict() for p in plans],
                                                     "trtexec": command}, indent=2) + "\n")
        (out_dir / SCRIPT_FILE).write_text(build_script(command))
        (out_dir / SCRIPT_FILE).chmod(0o755)
        extra: dict[str, Any] = {"profiles": [p.name for p in plans], "engine_build": None,
                                 "kernels": {"cuda": "IAttention (ONNX opset-23 Attention)"}}
        if not opts.onnx_only:
            from targets.tensorrt.engine import build_engine

            inp.progress("tensorrt: building engine", 0.6)
            cache = Path(opts.timing_cache) if opts.timing_cache else None
            extra["engine_build"] = build_engine(onnx_path, out_dir, plans, opts.optimization_level, cache)
        return Lowered(io=canonical_io(cfg, inp.precision), cache=cache_contract(cfg, inp.capacity, inp.precision),
                       extra=extra)

    def load(self, artifact: Path, manifest: dict[str, Any], device: str | None) -> Any:
        from targets.tensorrt.runner import EngineRunner, OnnxProxyRunner

        target, cfg, cache = manifest["target"], manifest["model"]["config"], manifest["cache"]
        if target.get("engine_build") and _tensorrt_reason() is None:
            return EngineRunner(artifact, manifest)
        if target["precision"] == "bf16":
            raise NotMeasurable("the bf16 ONNX cannot run on ONNX Runtime's CPU EP (no bf16 MatMul) and no "
                                "TensorRT engine can run here; validate on a machine with TensorRT and a GPU")
        dtype = {"fp16": "float16", "fp32": "float32"}[target["precision"]]
        return OnnxProxyRunner(artifact, cache["capacity"], cache["window"], cfg["num_hidden_layers"],
                               (cfg["num_key_value_heads"], cfg["head_dim"]), dtype)

