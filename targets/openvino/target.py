"""The openvino target: lower the exported program to an OpenVINO IR and drive it with a Runner.

Steps of ``lower``, in order: check options and device; convert (weights as Parameters); name the
ports; stateful transformation (default); bind weights one tensor at a time, int8/int4 compressed by
NNCF as they stream in; ``save_model`` without the silent fp16 compression; the rotary tables marked
`precise` (f32 at any inference precision) and, in fp16/bf16 IRs, the lm_head writing f32 logits itself;
tokenizer IRs where convertible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.contract import CacheContract, TensorSpec, cache_contract, canonical_io
from exporter.manifest import listed_file
from exporter.model import parameter_shapes
from targets.base import LowerInput, Lowered, check_supported
from targets.openvino import compress, convert, graph_cache, logits, lora, marks, runner, stateful, tokenizer, weights
from targets.openvino.options import (DEVICES, PRECISIONS, SUPPORT_TABLE, OpenVinoOptions, check_options,
                                      runtime_hints)
from targets.resources import ExportMemory

MODEL_XML = "openvino_model.xml"
KERNEL = "ScaledDotProductAttention"
RAW_CACHE_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "fp32", "int4": "fp32"}


def stateful_io(cfg: Any) -> list[TensorSpec]:
    """The stateful IR's ports: OpenVINO GenAI's names; the cache is internal."""
    return [TensorSpec("input_ids", "int64", ("batch", "chunk"), "input_ids"),
            TensorSpec("position_ids", "int64", ("batch", "chunk"), "positions (-1 = padding)"),
            TensorSpec("attention_mask", "int64", ("batch", "past+chunk"),
                       "slot mask over [cached slots; chunk]: 1 = real token, 0 = padding"),
            TensorSpec("beam_idx", "int32", ("batch",), "cache row order (arange keeps rows)"),
            TensorSpec("logits", "float32", ("batch", "chunk", cfg.vocab_size), "logits")]


def _shape(inp: LowerInput, layout: str) -> tuple[Any, dict[str, Any]]:
    """The converted model before its weights are bound, and what the manifest records about it."""
    inp.progress("converting to OpenVINO", 0.0)
    model = convert.convert(inp.program(), layout).model
    model.set_friendly_name("mistral-export")  # not OpenVINO's per-process counter: the same bytes each build
    linears = lora.name_linears(model)  # OpenVINO GenAI finds a PEFT tensor's layer by this name
    stateful.name_ports(model, inp.config, layout)
    widened = logits.f32_logits(model)  # typed fp16/bf16 IRs: the lm_head writes f32 itself
    if layout == "concat":
        stateful.add_beam_idx(model, inp.config)
        stateful.make_stateful(model, inp.config)
    stateful.name_unnamed(model)
    return model, {"named_linears": linears, "widened": widened}


def weight_free(inp: LowerInput, layout: str) -> tuple[Any, dict[str, Any]]:
    """_shape through the lowered-graph cache (graph_cache.py); adapters' builds are not cached."""
    cache = None if inp.adapters else graph_cache.GraphCache.open()
    if cache is None:
        model, shaped = _shape(inp, layout)
        return model, {**shaped, "graph_cache": "off"}
    # A hit never deserializes the program: its digest comes from the trace cache's bytes.
    spec = graph_cache.graph_spec(inp.trace.digest, {"config": inp.config.to_dict(), "capacity": inp.capacity,
                                                     "layout": layout})
    hit = cache.load(spec, parameter_shapes(inp.config))
    if hit is not None:
        inp.progress("openvino: converted model from the cache", 0.0)
        return hit[0], {**hit[1], "graph_cache": "hit"}
    model, shaped = _shape(inp, layout)
    cache.store(spec, model, shaped)
    return model, {**shaped, "graph_cache": "miss"}


class OpenVinoTarget:
    """OpenVINO IR (stateful by default) with ScaledDotProductAttention per layer; NNCF int8/int4."""

    name = "openvino"
    devices = tuple(DEVICES)
    precisions = PRECISIONS
    # Switchable LoRA adapters (build --adapters): files OpenVINO GenAI's AdapterConfig applies.
    runtime_adapter_precisions = ("fp32",)
    thread_option = "threads"  # the option bench --threads overrides
    support_table = SUPPORT_TABLE
    options_type = OpenVinoOptions
    runtime_packages = ("openvino", "nncf", "openvino-tokenizers", "openvino-genai")
    # save_model serialises an in-memory model: output weights + baseline (1.11-1.22x the output at 7B).
    export_memory = ExportMemory(output_factor=1.25, tensors_in_flight=2)
    device_resources = {"gpu": "intel_gpu", "npu": "intel_npu"}

    def check_available(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "the openvino package is not installed (pip install 'mistral-export[openvino]')"
        return None

    def kernels(self) -> dict[str, str]:
        return {f"{d}/{p}": f"{KERNEL} (stateful KV cache{', NNCF weights' if p.startswith('int') else ''})"
                for d, ps in SUPPORT_TABLE.items() for p in ps}

    def lower(self, inp: LowerInput, out_dir: Path) -> Lowered:
        cfg, options = inp.config, inp.options
        check_supported(self, inp.device, inp.precision, SUPPORT_TABLE)
        check_options(cfg, inp.precision, options)
        runner.resolve_device(runner.core_with_cache(), inp.device)
        layout = "ring" if options.stateless else "concat"
        model, shaped = weight_free(inp, layout)
        linears, widened = shaped["named_linears"], shaped["widened"]
        configs = compress.tensor_configs(cfg, inp.precision, options)
        weights.bind(model, inp.weight, inp.progress, configs, inp.weight_rows)
        compression = compress.record(cfg, inp.precision, options)
        if compression and not compression["streamed"]:
            inp.progress("compressing the whole model (int4 ratio < 1)", 0.0)
            compress.compress_whole(model, cfg, inp.precision, options)
        ops = stateful.op_counts(model)
        if ops.get(KERNEL, 0) != cfg.num_hidden_layers:
            raise AssertionError(f"expected one {KERNEL} per layer, the IR has {ops.get(KERNEL, 0)}")
        import openvino as ov

        attributes = {name: marks.PRECISE for name in marks.rotary_nodes(model)}
        if widened is not None:
            attributes[widened] = marks.DECOMPRESSION
        stateful.name_unnamed(model)  # what binding and NNCF added
        ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=False)
        del model
        marks.mark(out_dir / MODEL_XML, attributes)
        adapters = lora.write_adapters(out_dir, inp.adapters) if inp.adapters else None
        tok = tokenizer.write_tokenizer(inp.tokenizer_dir, out_dir)
        tokenizer.write_genai_config(cfg, out_dir)
        hints = runtime_hints(inp.precision, options)
        cache_dtype = hints.get("KV_CACHE_PRECISION") or f"device default (IR {RAW_CACHE_TYPES[inp.precision]})"
        if options.stateless:
            io = canonical_io(cfg, RAW_CACHE_TYPES[inp.precision])
            cache: CacheContract = cache_contract(cfg, inp.capacity, RAW_CACHE_TYPES[inp.precision])
        else:
            io = stateful_io(cfg)
            cache = cache_contract(cfg, inp.capacity, cache_dtype, residence="stateful")
        return Lowered(io=io, cache=cache, extra={
            "model_file": MODEL_XML, "layout": layout, "runtime_hints": hints, "compression": compression,
            "ops": {k: ops.get(k, 0) for k in (KERNEL, "ReadValue", "Assign", "ScatterElementsUpdate")},
            "tokenizer_ir": tok, "kernels": {inp.device: KERNEL}, "named_linears": linears,
            "graph_cache": shaped["graph_cache"],
            **({"adapters": adapters} if adapters else {})})

    def readback(self, artifact: Path, manifest: dict[str, Any], source: Any) -> Any:
        """The weights as OpenVINO decompresses them, each checked against the source compressed again."""
        from targets.openvino.readback import readback

        return readback(Path(artifact), manifest, source)

    def fidelity_gates(self, manifest: dict[str, Any], runner: Any) -> str:
        """The row of the arithmetic the device resolved (compressed precisions keep its defaults)."""
        device = runner.describe_device()
        inference, cache = device.get("inference_precision"), device.get("kv_cache_precision")
        if inference in ("bf16", "f16"):
            return {"bf16": "bf16", "f16": "fp16"}[inference]
        return "u8-kv-cache" if cache in ("u8", "u4", "i8") else "fp32"

    def load(self, artifact: Path, manifest: dict[str, Any], device: str | None) -> Any:
        target = manifest["target"]
        device = device or target["device"]
        check_supported(self, device, target["precision"], SUPPORT_TABLE)
        # A manifest path, so it must be one of the artifact's own verified files (never ../ or absolute).
        xml = listed_file(Path(artifact), manifest, target.get("model_file", MODEL_XML))
        listed_file(Path(artifact), manifest, xml.with_suffix(".bin").relative_to(artifact).as_posix())
        threads = int(target["options"].get("threads", 0))
        compiled, core, name = runner.compile_model(xml, device, target["runtime_hints"], threads)
        cache, cfg = manifest["cache"], manifest["model"]["config"]
        opened: Any
        if target["layout"] == "ring":
            opened = runner.StatelessRunner(compiled, core, name, cache["capacity"], cache["window"],
                                            cfg["num_key_value_heads"], cfg["head_dim"])
        else:
            opened = runner.StatefulRunner(compiled, core, name, cache["capacity"], cache["window"])
        opened.reopen = lambda adapter: runner.compile_model(xml, device, target["runtime_hints"], threads, adapter)[0]
        return opened
