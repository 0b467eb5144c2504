"""Target options, the device x precision table, and the runtime hints each precision implies."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.config import MistralConfig
from exporter.errors import TargetUnavailable, UserError

# Our lower-case device names -> OpenVINO's.
DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# bf16 is a CPU inference precision (AVX512-BF16/AMX); Intel GPUs and NPUs compute in f16.
SUPPORT_TABLE = {"cpu": PRECISIONS, "gpu": ("fp32", "fp16", "int8", "int4"),
                 "npu": ("fp16", "int8", "int4"), "auto": PRECISIONS}
# Float precisions are realised by the runtime: inference precision and KV-cache precision.
# Weight-only int8/int4 leave both to the device default ("" = not set; bf16 and u8 on recent CPUs).
DEFAULT_HINTS = {"fp32": ("f32", "f32"), "fp16": ("f16", "f16"), "bf16": ("bf16", "bf16"),
                 "int8": ("", ""), "int4": ("", "")}
HINT_VALUES = ("", "f32", "f16", "bf16")
KV_VALUES = ("", "f32", "f16", "bf16", "u8")
MODES = {"int8": ("asym", "sym"), "int4": ("sym", "asym")}  # first = default
GROUP_CANDIDATES = (128, 64, 32, 16)
# The default int4 group: 64 where it divides every layer width. From benchmarks/int4_table.py (~155M,
# against optimum-intel's default int4): group 64 decodes at 0.86x with mean KL 0.0360 (peer 0.0375),
# group 128 at 0.89x with 0.0406; prefill 0.97-1.00x for both.
DEFAULT_GROUPS = (64, 32, 16)


@dataclass(frozen=True)
class OpenVinoOptions:
    """--option key=value settings of the openvino target."""

    stateless: bool = False  # explicit past/present cache IO (the canonical ring) instead of internal state
    inference_precision: str = ""  # f32, f16, bf16; "" = implied by --precision
    kv_cache_precision: str = ""  # f32, f16, bf16, u8; "" = implied by --precision
    mode: str = ""  # int8: asym | sym; int4: sym | asym; "" = the first
    group_size: int = 0  # int4 group; 0 = 64 or the largest of 32/16 dividing every layer; -1 = per channel
    ratio: float = 1.0  # int4: share of weights in int4, the rest int8
    all_layers: bool = True  # int4: embedding and lm_head in int4 too; false keeps them int8 (nncf's backup)
    threads: int = 0  # inference threads; 0 = runtime default


def runtime_hints(precision: str, options: OpenVinoOptions) -> dict[str, str]:
    """The compile properties a precision implies, options overriding; empty values are not set."""
    if options.inference_precision not in HINT_VALUES:
        raise UserError(f"inference_precision={options.inference_precision!r}; valid: f32, f16, bf16")
    if options.kv_cache_precision not in KV_VALUES:
        raise UserError(f"kv_cache_precision={options.kv_cache_precision!r}; valid: f32, f16, bf16, u8")
    inference, kv = DEFAULT_HINTS[precision]
    hints = {"INFERENCE_PRECISION_HINT": options.inference_precision or inference,
             "KV_CACHE_PRECISION": options.kv_cache_precision or kv}
    return {k: v for k, v in hints.items() if v}


def compression_mode(precision: str, options: OpenVinoOptions) -> str | None:
    """nncf mode name (int8_asym, int4_sym, ...) or None for float precisions."""
    if precision not in MODES:
        if options.mode:
            raise UserError(f"option mode={options.mode!r} applies to int8/int4 only, not {precision}")
        return None
    mode = options.mode or MODES[precision][0]
    if mode not in MODES[precision]:
        raise UserError(f"option mode={mode!r} is not valid for {precision}; valid: {', '.join(MODES[precision])}")
    return f"{precision}_{mode}"


def reduction_dims(cfg: MistralConfig) -> dict[str, int]:
    """Input width of every compressed MatMul: what a quantization group must divide."""
    return {"hidden_size": cfg.hidden_size, "heads * head_dim": cfg.num_attention_heads * cfg.head_dim,
            "intermediate_size": cfg.intermediate_size}


def group_size(cfg: MistralConfig, options: OpenVinoOptions) -> int:
    """The int4 group size, checked before any work (nncf fails when a group exceeds a layer's width)."""
    dims = reduction_dims(cfg)
    fits = [g for g in GROUP_CANDIDATES if all(d % g == 0 for d in dims.values())]
    if options.group_size == 0:
        defaults = [g for g in fits if g in DEFAULT_GROUPS]
        if not defaults:
            raise UserError(f"no int4 group size of {DEFAULT_GROUPS} divides every layer width {dims}; "
                            "pass --option group_size=-1 for per-channel scales")
        return defaults[0]
    if options.group_size == -1:
        return -1
    bad = {name: d for name, d in dims.items() if options.group_size <= 0 or d % options.group_size}
    if bad:
        hint = f"e.g. group_size={fits[0]}" if fits else "group_size=-1 (per channel)"
        raise UserError(f"int4 group_size={options.group_size} does not divide {bad} of this model; "
                        f"choose one that divides every layer width ({hint}), or -1 for per channel")
    return options.group_size


def check_options(cfg: MistralConfig, precision: str, options: OpenVinoOptions) -> None:
    """Every option problem, raised before conversion starts."""
    runtime_hints(precision, options)
    if compression_mode(precision, options):
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise TargetUnavailable(f"--precision {precision} needs nncf: pip install 'mistral-export[openvino]'") from None
    if precision == "int4":
        group_size(cfg, options)
        if not 0.0 < options.ratio <= 1.0:
            raise UserError(f"option ratio={options.ratio} must be in (0, 1]")
    elif options.group_size or options.ratio != 1.0:
        raise UserError(f"options group_size and ratio apply to int4 only, not {precision}")
    if options.threads < 0:
        raise UserError(f"option threads={options.threads} must be >= 0 (0 = runtime default)")
