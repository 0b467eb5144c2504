"""The `mistral-export` command line: thin typer commands over exporter/, targets/ and validation/.

Exit codes: 0 ok, 1 internal error, 2 bad usage or input, 3 a validation gate failed.
Set MISTRAL_EXPORT_DEBUG=1 to see the full traceback of any error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import logging

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from exporter import signals
from exporter.errors import GateFailure, UserError
from exporter.manifest import listed_dir, read_manifest
from pipeline.build import BuildRequest, build
from pipeline.multi import ALL_AVAILABLE, expand_targets
from targets import registry
from validation.markdown import bound_sign, fmt_value

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
                  help="Export a Mistral-architecture checkpoint to validated artifacts for each runtime.")
# Plain text: messages carry user paths and names, which rich markup would reinterpret ("[/]").
out = Console(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


# Disk full, quota, read-only file system: conditions of the machine that the user fixes.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def guarded(fn: F) -> F:
    """Map domain errors to one line and an exit code; tracebacks only with MISTRAL_EXPORT_DEBUG."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (UserError, GateFailure) as exc:
            if os.environ.get("MISTRAL_EXPORT_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            signals.ignore_further()  # a second Ctrl-C must not turn the exit into a traceback
            typer.echo(f"interrupted ({signals.signal_name(exc)}); nothing was left half-written", err=True)
            raise typer.Exit(signals.exit_code(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: anything else is our bug
            if os.environ.get("MISTRAL_EXPORT_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
                # The machine, not the input or our code: every write is staged, so what was there is intact.
                where = f" ({exc.filename})" if exc.filename else ""
                typer.echo(f"error: {exc.strerror or exc}{where}; free space (or make it writable) and run "
                           "again; nothing was left half-written", err=True)
                raise typer.Exit(2) from None
            typer.echo(f"internal error: {type(exc).__name__}: {exc}\n"
                       "Set MISTRAL_EXPORT_DEBUG=1 for the full traceback and report it.", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[str, float], None]]:
    """A rich progress bar fed by (message, fraction) callbacks; silent when disabled."""
    if not enabled:
        yield lambda message, fraction: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
    with bar:
        task = bar.add_task("starting", total=1.0)
        yield lambda message, fraction: bar.update(task, description=message[:60], completed=fraction)


def parse_kv(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option takes key=value, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_adapters(items: list[str]) -> dict[str, Path]:
    """--adapters name=DIR[,name=DIR...], repeatable, into {name: folder}; a name given twice is an error."""
    named: dict[str, Path] = {}
    for item in (part for raw in items for part in raw.split(",") if part.strip()):
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UserError(f"--adapters takes name=DIR, got {item!r}")
        if name.strip() in named:
            raise UserError(f"--adapters names {name.strip()!r} twice; give each adapter its own name")
        named[name.strip()] = Path(folder.strip())
    return named


@app.command("build")
@guarded
def build_cmd(
    target: Annotated[str, typer.Option(help="Target to lower to (see `mistral-export targets`); several as a,b,c or all-available: one trace, one artifact each under --out.")],
    checkpoint: Annotated[Path | None, typer.Option(help="A Hugging Face folder (config.json, *.safetensors), a Mistral download folder (params.json, consolidated.safetensors), or a hub id (owner/name[@revision]) already in the local Hugging Face cache; nothing is downloaded.")] = None,
    preset: Annotated[str | None, typer.Option(help="Built-in preset: tiny (default), mistral-7b-v0.1, mistral-7b-v0.3.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors), merged into the weights as they stream; quantized precisions quantize the merged weights.")] = None,
    adapters: Annotated[list[str] | None, typer.Option(help="Switchable LoRA adapters, name=DIR[,name2=DIR2] (repeatable), onnxruntime and openvino, fp32: the base is kept and each adapter is written to adapters/ in the runtime's own form (.onnx_adapter for onnxruntime and onnxruntime-genai, .safetensors for OpenVINO GenAI).")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, fp16, bf16, or a target's quantized precision (int8, int4) [default: the target's first, see `targets`].")] = None,
    device: Annotated[str | None, typer.Option(help="Device the artifact is built and validated for [default: the target's first, see `targets`].")] = None,
    max_context: Annotated[int, typer.Option(help="KV-cache capacity for models without a sliding window.")] = 2048,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Artifact folder [default: artifacts/<model>-<target>-<precision>].")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    option: Annotated[list[str] | None, typer.Option(help="Target option key=value (repeatable).")] = None,
    validate: Annotated[bool, typer.Option(help="Run the validation stage at the end of the build.")] = True,
    cache: Annotated[bool, typer.Option(help="Reuse a cached trace of the same config and options.")] = True,
    onnx_only: Annotated[bool, typer.Option(help="TensorRT: write the engine-ready ONNX and the trtexec build plan, no engine.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON instead of a summary.")] = False,
) -> None:
    """Trace the model once and write a whole, validated artifact folder for one target."""
    options = parse_kv(option or [])
    if onnx_only:
        if target != "tensorrt":
            raise UserError("--onnx-only applies to --target tensorrt only")
        options["onnx_only"] = "true"
    req = BuildRequest(target=target, checkpoint=checkpoint, preset=preset, precision=precision, device=device,
                       max_context=max_context, out=out_dir, force=force, options=options, use_cache=cache,
                       adapter=adapter, adapters=parse_adapters(adapters or []))
    validator = None
    if validate:
        from validation.stage import build_validator
        validator = build_validator()
    if "," in target or target == ALL_AVAILABLE:
        _build_many(req, expand_targets(target), validator, json_out)
        return
    with progress_bar(not json_out) as bar:
        result = build(req, bar, validator)
    summary = result.manifest["validation"]
    if json_out:
        print(json.dumps(result.manifest, indent=2))
    else:
        trace = result.manifest["trace"]
        out.print(f"wrote {result.out} ({len(result.manifest['files'])} files); trace "
                  f"{'cache hit' if trace['cache_hit'] else 'built'} in {trace['seconds']:.2f}s; "
                  f"validation: {summary['status']}", highlight=False)
    if summary.get("status") == "failed":
        raise GateFailure(f"validation gates failed; see {result.out}/report.md")


def _build_many(req: BuildRequest, names: list[str], validator: Any, json_out: bool) -> None:
    """One trace, one artifact per target under --out (default artifacts/), build-summary.json beside them."""
    from pipeline.multi import build_many, exit_code

    if req.device and len(names) > 1:
        raise UserError("--device applies to a single target; multi-target builds use each target's default")
    bars: list[Any] = []

    def progress_for(name: str) -> Callable[[str, float], None]:
        if json_out:
            return lambda message, fraction: None
        bar = bars[0]
        task = bar.add_task(name, total=1.0)
        return lambda message, fraction: bar.update(task, description=f"{name}: {message[:50]}", completed=fraction)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), console=err, disable=not err.is_terminal)
    bars.append(bar)
    with bar if not json_out else contextlib.nullcontext():
        summary = build_many(req, names, progress_for, validator)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        table = Table("target", "status", "validation", "seconds", "artifact or error")
        for row in summary["targets"]:
            table.add_row(row["target"], row["status"], str(row.get("validation", "")), str(row["seconds"]),
                          row.get("artifact") or row.get("error", ""))
        out.print(table)
        out.print(f"{summary['traces']} trace(s) for {len(names)} target(s) in {summary['total_seconds']} s",
                  highlight=False)
    code = exit_code(summary)
    if code:
        raise typer.Exit(code)


@app.command("targets")
@guarded
def targets_cmd(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every target: available, or the reason it is not; its devices, precisions and kernels."""
    rows = []
    for name in registry.names():
        target = registry.get(name)
        reason = target.check_available()
        kernels = target.kernels() if hasattr(target, "kernels") else {}
        rows.append({"name": name, "available": reason is None, "reason": reason, "devices": list(target.devices),
                     "precisions": list(target.precisions), "kernels": kernels})
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table("target", "status", "devices", "precisions")
    for row in rows:
        status = Text("available", style="green") if row["available"] else \
            Text.assemble(("unavailable", "yellow"), f": {row['reason']}")
        table.add_row(row["name"], status, ", ".join(row["devices"]), ", ".join(row["precisions"]))
    out.print(table)
    for row in rows:
        for pair, kernel in row["kernels"].items():
            out.print(f"  {row['name']} {pair}: {kernel}", highlight=False)


@app.command("inspect")
@guarded
def inspect_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
) -> None:
    """Print an artifact's manifest (files are checked against their sha256)."""
    manifest = read_manifest(artifact)
    if json_out:
        print(json.dumps(manifest, indent=2))
        return
    t, c, m = manifest["target"], manifest["cache"], manifest["model"]
    out.print(Text.assemble((str(artifact), "bold"), f"  schema v{manifest['schema_version']}"))
    out.print(f"model    {m['name']} ({m['source']}): {m['config']['num_hidden_layers']} layers, "
              f"hidden {m['config']['hidden_size']}, window {m['config']['sliding_window']}", highlight=False)
    out.print(f"target   {t['name']} on {t['device']}, precision {t['precision']}, options {t['options']}",
              highlight=False)
    out.print(f"cache    capacity {c['capacity']}, {c['policy']}, window {c['window']}, {c['layout']}, "
              f"{c['dtype']}, {c['residence']}", highlight=False)
    out.print(f"tool     {manifest['tool']}", highlight=False)
    out.print(f"valid.   {manifest['validation'].get('status')}", highlight=False)
    table = Table("file", "bytes", "sha256")
    for f in manifest["files"]:
        table.add_row(f["path"], f"{f['bytes']:,}", f["sha256"][:16] + "…")
    out.print(table)


def prompt_tokens(artifact: Path, manifest: dict[str, Any], prompt_ids: str | None, prompt: str | None,
                  chat: list[str], system: str | None, tokenizer: tuple[Path, Any] | None) -> tuple[list[int], str]:
    """The prompt's ids and how they were made; `tokenizer` is the artifact's (folder, loaded HF tokenizer)."""
    if sum(x is not None and x != [] for x in (prompt_ids, prompt, chat)) != 1:
        raise UserError("give exactly one of --prompt-ids, --prompt or --chat")
    if system is not None and not chat:
        raise UserError("--system goes with --chat")
    if prompt_ids is not None:
        try:
            ids = [int(x) for x in prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
        vocab = manifest["model"]["config"]["vocab_size"]
        bad = [i for i in ids if not 0 <= i < vocab]
        if not ids or bad:
            raise UserError(f"--prompt-ids needs ids in [0, {vocab}); got {bad or 'none'}")
        return ids, "ids"
    if tokenizer is None:
        raise UserError(f"artifact {artifact} has no tokenizer; use --prompt-ids")
    folder, hf = tokenizer
    if chat:
        from validation.text import encode_chat
        return encode_chat(folder, chat, system, hf)
    return list(hf.encode(prompt)), "tokenizer"


@app.command("generate")
@guarded
def generate_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt as comma-separated token ids, e.g. 1,2,3.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text, encoded with the artifact's tokenizer (BOS first).")] = None,
    chat: Annotated[list[str] | None, typer.Option(
        help="A chat turn; repeat for user, assistant, user, ... (ending with the user). Encoded in Mistral's "
             "instruct format by mistral-common for Mistral tokenizers, else by the tokenizer's chat template.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for --chat.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 16,
    device: Annotated[str | None, typer.Option(help="Device to run on [default: the artifact's].")] = None,
    adapter: Annotated[str | None, typer.Option(help="Run with this switchable LoRA adapter of the artifact (built with --adapters) [default: the base model].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print {\"token_ids\": [...], \"text\": ...} only "
                                                          "(text is null without a tokenizer).")] = False,
) -> None:
    """Greedy decoding through the artifact's own runner; with a tokenizer the text streams as it is generated."""
    from targets.generate import greedy_generate

    from exporter.config import MistralConfig
    from exporter.limits import check_caches_fit

    manifest = read_manifest(artifact)
    check_caches_fit(MistralConfig(**manifest["model"]["config"]), manifest["cache"]["capacity"], 1, 1, "generate")
    manifest, runner = registry.load_runner(artifact, device, adapter)
    tokenizer = None
    if manifest["model"].get("tokenizer"):
        from validation.text import load_tokenizer
        folder = listed_dir(artifact, manifest, manifest["model"]["tokenizer"])
        tokenizer = folder, load_tokenizer(folder)
    ids, how = prompt_tokens(artifact, manifest, prompt_ids, prompt, chat or [], system, tokenizer)
    stream = None
    if tokenizer is not None:
        from validation.text import TextStream
        stream = TextStream(tokenizer[1])

    def show(row: int, token: int) -> None:
        if stream is not None:
            piece = stream.push(token)
            if not json_out and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()

    new = greedy_generate(runner, [ids], max_new_tokens, manifest["model"]["config"].get("eos_token_id"),
                          on_token=show)[0]
    text = stream.text() if stream is not None else None
    if json_out:
        print(json.dumps({"token_ids": new, "text": text, "prompt_tokens": len(ids), "prompt_from": how},
                         ensure_ascii=False))
        return
    if stream is not None:
        sys.stdout.write("\n")
    out.print(f"prompt {len(ids)} tokens ({how}) -> {len(new)} new: {new}", highlight=False)


def _print_report(rep: dict[str, Any]) -> None:
    p, lat = rep["parity"], rep["latency"]
    colors = {"passed": "green", "failed": "red"}
    out.print(Text.assemble("parity: ", (p["status"], colors.get(p["status"], "yellow")), f" (level {p['level']})"))
    for name in ("fidelity", "quality") if p["status"] != "not-run" else ():
        part = p[name]
        if part["status"] == "same-as-fidelity":
            out.print(f"  {name}: {part['reason']}")
            continue
        worst = ", ".join(f"{k} {v:.3g}" for k, v in part["worst"].items())
        weights = part.get("weights")
        out.print(Text.assemble(f"  {name} ", (part["status"], colors.get(part["status"], "yellow")),
                                f" (gates {part['precision_gates']}): {worst}; corpus mean KL "
                                f"{part['corpus']['mean_kl']:.3g}, same top {part['corpus']['same_top_pct']:.1f} %"
                                + (f"; stored weights {weights['status']} ({weights['checked']} checked)"
                                   if weights else "")))
    tok = p.get("tokenizer")
    if tok:
        rows = ", ".join(f"{r['tokenizer']} {r['status']}" for r in tok.get("tokenizers", []))
        out.print(Text.assemble("  tokenizer ", (tok["status"], colors.get(tok["status"], "yellow")),
                                f": {rows or tok.get('reason', '')}"))
    for name, part in (p.get("adapters") or {}).items():
        out.print(Text.assemble(f"  adapter {name} ", (part["status"], colors.get(part["status"], "yellow")),
                                f": max_abs {fmt_value(part['fidelity']['worst'].get('max_abs'))} against the "
                                "reference with it merged"))
    for f in p.get("failures", [])[:10]:
        out.print(Text.assemble("  ", ("FAIL", "red"), f" {f['section']}: {f['metric']} at {f['step']} = "
                                f"{fmt_value(f['value'])} ({bound_sign(f)} {fmt_value(f['threshold'])})"))
    if lat["status"] == "measured":
        pre = ", ".join(f"T={r['tokens']}: {r['median_ms']:.2f} ms" for r in lat["prefill"])
        dec = ", ".join(f"fill {r['fill']}: {r['median_ms']:.2f} ms" for r in lat["decode"])
        out.print(f"latency ({lat['level']}, batch {lat['batch']}): prefill {pre}; decode {dec}; "
                  f"peak RSS {lat['peak_rss_mb']} MB")
        for note in lat.get("notes", []):
            out.print(f"  note: {note}")


@app.command("validate")
@guarded
def validate_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    device: Annotated[str | None, typer.Option(help="Device to validate on [default: the artifact's].")] = None,
    precision_gates: Annotated[str | None, typer.Option(help="Gate row for the comparison with the float checkpoint (quality; for float artifacts the only one): fp32, fp16, bf16, int8, int4 [default: the artifact's precision]. Fidelity of quantized artifacts is always gated by the row of the runtime's arithmetic.")] = None,
    reference_checkpoint: Annotated[Path | None, typer.Option(help="Original checkpoint, if not at its recorded path.")] = None,
    reference_adapter: Annotated[Path | None, typer.Option(help="Original LoRA adapter folder (a merged --adapter), if not at its recorded path.")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="Switchable adapter to validate besides the base (repeatable); 'none' for the base alone [default: every adapter the artifact has].")] = None,
    reference_dtype: Annotated[str, typer.Option(help="Reference precision: auto (fp32 unless it would not fit in memory, then bf16 with gates no tighter than bf16's), fp32, bf16.")] = "auto",
    latency: Annotated[bool, typer.Option(help="Also measure latency.")] = True,
    cache: Annotated[bool, typer.Option(help="Let the runtime reuse its compiled-model cache (OpenVINO).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")] = False,
) -> None:
    """Fidelity (is the artifact the model it claims to be: for quantized artifacts against its own
    weights read back, which are also checked exactly) and quality (against the float checkpoint),
    each with corpus statistics; latency. Exit 3 on a failed gate. Writes report.json, report.md,
    parity.png and latency.png into the artifact, atomically."""
    from validation.stage import ValidateRequest, validate_artifact

    if reference_dtype not in ("auto", "fp32", "bf16"):
        raise UserError(f"--reference-dtype must be auto, fp32 or bf16, got {reference_dtype!r}")
    req = ValidateRequest(device=device, precision_gates=precision_gates, latency=latency,
                          reference_checkpoint=reference_checkpoint, reference_adapter=reference_adapter,
                          reference_dtype=reference_dtype,
                          adapters=None if not adapter else tuple(a for a in adapter if a != "none"),
                          use_cache=cache)
    with progress_bar(not json_out) as bar:
        rep = validate_artifact(artifact, req, bar)
    if json_out:
        from exporter.manifest import dumps
        print(dumps(rep), end="")
    else:
        _print_report(rep)
        out.print(f"wrote {artifact}/report.json, report.md and plots")
    if rep["parity"]["status"] == "failed":
        first = rep["parity"]["failures"][0]
        raise GateFailure(f"{len(rep['parity']['failures'])} parity gate(s) failed, first: {first['section']} "
                          f"{first['metric']} at {first['step']} = {fmt_value(first['value'])} "
                          f"(threshold {bound_sign(first)} {fmt_value(first['threshold'])})")


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, e.g. 16,128,512; got {text!r}") from None


@app.command("bench")
@guarded
def bench_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    device: Annotated[str | None, typer.Option(help="Device to run on [default: the artifact's].")] = None,
    prompt_lengths: Annotated[str | None, typer.Option(help="Prefill (TTFT) prompt lengths, a,b,c [default: 16,128,512].")] = None,
    fills: Annotated[str | None, typer.Option(help="Decode cache fills, a,b [default: 16,128,1024].")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point (the median and p90 are reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs before each point.")] = 2,
    batch: Annotated[int, typer.Option(help="Rows per prefill and decode step.")] = 1,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads of the runtime (onnxruntime, openvino) [default: the artifact's setting, else the runtime's].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")] = False,
) -> None:
    """Latency only: prefill per prompt length, decode per cache fill, memory (writes the reports).
    Points the artifact cannot serve (past its capacity, its context or the positions its RoPE table
    holds) are measured at the largest it can, with a note in the report."""
    from validation.latency import LatencySettings
    from validation.stage import ValidateRequest, validate_artifact

    settings = LatencySettings(prompt_lengths=_ints(prompt_lengths, "--prompt-lengths"), fills=_ints(fills, "--fills"),
                               repeats=repeats, warmup=warmup, batch=batch, threads=threads)
    settings.check()
    with progress_bar(not json_out) as bar:
        rep = validate_artifact(artifact, ValidateRequest(device=device, parity=False, latency_settings=settings), bar)
    if json_out:
        from exporter.manifest import dumps
        print(dumps(rep), end="")
    else:
        _print_report(rep)


class _StderrWarnings(logging.Handler):
    """Our warnings (a rebuilt cache entry, a disabled cache) as one plain line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"warning: {record.getMessage()}\n")


def configure_logging() -> None:
    logger = logging.getLogger("mistral_export")
    if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))
        logger.propagate = False


def run() -> int:
    """The CLI (entry.main installs signal handlers and switches telemetry off first)."""
    configure_logging()
    if not os.environ.get("MISTRAL_EXPORT_DEBUG"):
        # Library deprecation chatter (torch internals) is not the user's concern; debug mode shows it.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # Converters draw their own tqdm bars per pass; ours (rich) already report progress.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt as exc:  # while typer builds the command, before any work
        typer.echo(f"interrupted ({signals.signal_name(exc)}); nothing was written", err=True)
        return signals.exit_code(exc)
    except SystemExit as exc:
        interrupt = _interrupt_typer_swallowed(exc)
        if interrupt is not None:
            typer.echo(f"interrupted ({signals.signal_name(interrupt)}); nothing was left half-written", err=True)
            return signals.exit_code(interrupt)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _interrupt_typer_swallowed(exc: SystemExit) -> KeyboardInterrupt | None:
    """A signal that arrived inside typer but outside a command (while it parsed or set up the call):
    typer turns it into a silent exit 130; it is reported like any other interrupt."""
    context = exc.__context__
    cause = getattr(context, "__cause__", None)
    return cause if isinstance(context, typer.Exit) and isinstance(cause, KeyboardInterrupt) else None


def main() -> int:
    from mistral_export.entry import main as entry_main

    return entry_main()


# Registered last: they build on the helpers above (matrix, report merge, report diff).
from mistral_export import cli_matrix  # noqa: E402,F401
