"""The ONNX Runtime target: the one exported program lowered to ONNX with ORT's own kernels.

Lowering: torch.onnx translates the program with a custom translation of the cached_attention node
onto com.microsoft::GroupQueryAttention (translate.py). That keeps GQA's own fused kernel and its
in-place windowed cache, which a generic converter cannot reach from the decomposed program (it
would emit Softmax attention plus a scatter that copies the cache every step). A few graph passes
then do what GQA needs: onnxruntime-genai's IO, RoPE folded into GQA, packed q/k/v, and streamed
weights. Pairs without a GQA kernel take the decomposed program through the standard opset-23
Attention op instead (kernels.py has the table). Parity for both forms comes from the validation
stage: the canonical fp32 program is the reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from targets.base import LowerInput, Lowered, check_supported
from targets.onnxruntime import kernels
from targets.resources import ExportMemory

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """Target options (--option key=value)."""

    attention: str = "auto"  # auto (the kernel table), gqa, or onnx-attention (the fallback)
    block_size: int = 32  # int4/int8: MatMulNBits block along K (a power of two >= 16)
    symmetric: bool = True  # int4/int8: symmetric blocks (no zero points)
    accuracy_level: int = 4  # int4/int8: MatMulNBits accuracy_level (4: int8 activations, CPU VNNI)
    quantize_lm_head: bool = True  # int4/int8: lm_head as MatMulNBits too (the embedding stays float)
    lm_head_bits: int = 0  # int4/int8: lm_head's MatMulNBits bits (0: the precision's; 8 under int4)
    fuse_rotary: bool = True  # GQA: RoPE inside GQA when head_dim % 16 == 0 (tables bound positions by
    #                           max_position_embeddings); else RoPE stays in the graph
    pack_qkv: bool = True  # GQA: one MatMul for q/k/v, fed to GQA as a packed query
    intra_op_threads: int = 0  # runner: ORT intra-op threads (0: ORT's default, one per core)
    cache_slack: int = -1  # runner: cache rows over the window (GQA compacts every slack+1 steps); -1: auto


class OnnxRuntimeTarget:
    """ONNX Runtime: GroupQueryAttention, MatMulNBits, onnxruntime-genai compatible artifacts."""

    name = "onnxruntime"
    devices = tuple(kernels.SUPPORT)
    precisions = ("fp32", "fp16", "bf16", "int8", "int4")
    # Switchable LoRA adapters (build --adapters): graph inputs over float weights.
    runtime_adapter_precisions = ("fp32",)
    thread_option = "intra_op_threads"  # the option bench --threads overrides
    support_table = kernels.SUPPORT
    options_type = OnnxRuntimeOptions
    runtime_packages = ("onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "onnx-ir")
    # Streams each tensor into external data: baseline + a tensor in flight (1.0-1.65 GiB at 7B).
    export_memory = ExportMemory(tensors_in_flight=2)
    device_resources = {"cuda": "GPU"}

    def check_available(self) -> str | None:
        try:
            import onnx_ir  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed (pip install 'mistral-export[onnxruntime]')"
        return None

    def kernels(self) -> dict[str, str]:
        return {f"{d}/{p}": k.describe() + ("" if (d, p) in kernels.VALIDATED else " (declared, not validated here)")
                for (d, p), k in kernels.table().items()}

    def lower(self, inp: LowerInput, out_dir: Path) -> Lowered:
        from targets.onnxruntime.lower import lower_to_files

        check_supported(self, inp.device, inp.precision, self.support_table)
        return lower_to_files(inp, out_dir)

    def readback(self, artifact: Path, manifest: dict[str, Any], source: Any) -> Any:
        """The artifact's weights as MatMulNBits computes with them, checked against the source."""
        from targets.onnxruntime.readback import readback

        return readback(Path(artifact), manifest, source)

    def fidelity_gates(self, manifest: dict[str, Any], runner: Any) -> str:
        """The gate row of the arithmetic the quantized graph really runs: MatMulNBits accuracy_level 4
        quantizes activations to int8 per block; levels 0-1 keep fp32 activations."""
        quant = manifest["target"].get("quantization") or {}
        return "int8-activations" if quant.get("accuracy_level", 0) >= 2 else "fp32"

    def load(self, artifact: Path, manifest: dict[str, Any], device: str | None) -> Any:
        from targets.onnxruntime.runner import GqaRunner, RingRunner, session

        target = manifest["target"]
        device = device or target["device"]
        check_supported(self, device, target["precision"], self.support_table)
        known = {f.name for f in dataclasses.fields(OnnxRuntimeOptions)}
        options = OnnxRuntimeOptions(**{k: v for k, v in target["options"].items() if k in known})
        cache = manifest["cache"]
        def open_session(initializers: dict[str, Any] | None = None) -> Any:
            return session(Path(artifact) / MODEL_FILE, device, options.intra_op_threads, initializers=initializers)

        sess = open_session()
        runner: Any
        if target["attention"] == kernels.GQA:
            runner = GqaRunner(sess, device, cache["capacity"], cache["window"], cache, options.intra_op_threads,
                               target["cache_buffer_rows"], target.get("rotary_positions"))
        else:
            runner = RingRunner(sess, device, cache["capacity"], cache["window"], cache, options.intra_op_threads)
        runner.reopen = open_session
        return runner
