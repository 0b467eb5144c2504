"""The commands beyond one build: `matrix` (jobs over checkpoints x targets x precisions x devices,
here or on Ray) and `report merge` / `report diff` (cross-device tables and regression gates)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporter.errors import UserError
from mistral_export.cli import app, err, guarded, out

report_app = typer.Typer(no_args_is_help=True, help="Merge validation reports across devices, or diff two runs.")
app.add_typer(report_app, name="report")


def _list(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _target_options(items: list[str]) -> dict[str, dict[str, str]]:
    """--option target:key=value -> {target: {key: value}}."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        target, colon, pair = item.partition(":")
        key, eq, value = pair.partition("=")
        if not colon or not eq or not target or not key:
            raise UserError(f"--option takes target:key=value for a matrix (e.g. onnxruntime:block_size=64), got {item!r}")
        options.setdefault(target.strip(), {})[key.strip()] = value.strip()
    return options


@app.command("matrix")
@guarded
def matrix_cmd(
    matrix_file: Annotated[Path | None, typer.Argument(help="MATRIX.toml: targets, precisions, devices, checkpoints, presets, max_context, validate, latency, [options.<target>]. Flags override it.")] = None,
    target: Annotated[str | None, typer.Option(help="Targets, a,b.")] = None,
    precision: Annotated[str | None, typer.Option(help="Precisions, p,q [default: each target's first]; a pair a target does not support is listed as unsupported.")] = None,
    device: Annotated[str | None, typer.Option(help="Devices, d,e [default: each target's first].")] = None,
    checkpoint: Annotated[list[str] | None, typer.Option(help="A checkpoint folder or cached hub id (repeatable).")] = None,
    preset: Annotated[list[str] | None, typer.Option(help="A built-in preset (repeatable) [default: tiny when no checkpoint is given].")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Target option target:key=value (repeatable).")] = None,
    max_context: Annotated[int | None, typer.Option(help="KV-cache capacity for models without a sliding window [default: 2048].")] = None,
    validate: Annotated[bool | None, typer.Option(help="Validate each artifact (parity gates; device checks as their own jobs) [default: on].")] = None,
    latency: Annotated[bool | None, typer.Option(help="Measure latency in each validation [default: on].")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the artifacts (one per job, named by its key) and matrix.json/.md/.png; on a cluster, a path every node reaches.")] = Path("artifacts/matrix"),
    executor: Annotated[str, typer.Option(help="local: one process per job on this machine; ray: one Ray task per job.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (auto, ray://host:port) [default: start a local cluster].")] = None,
    rebuild: Annotated[bool, typer.Option(help="Run every job, even those whose artifact is current.")] = False,
    memory_budget: Annotated[float | None, typer.Option(help="local: GiB the running jobs may declare together [default: 80% of the memory available].")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", help="local: jobs at once [default: one per core].")] = None,
    retries: Annotated[int, typer.Option(help="ray: retries of a job whose worker died.")] = 2,
    schedule_timeout: Annotated[float, typer.Option(help="Seconds after which a job that no node can run is reported unschedulable.")] = 120.0,
    cache: Annotated[bool, typer.Option(help="Reuse cached traces.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print matrix.json instead of the table.")] = False,
) -> None:
    """Build and validate every combination as its own job; skip jobs whose artifact is current; write
    matrix.json, matrix.md and matrix.png. Exit 1 on an internal error, 2 on bad input or an
    unschedulable job, 3 on a failed gate."""
    from pipeline.jobs import MatrixSpec, load_spec
    from pipeline.matrix import MatrixRequest, exit_code, run_matrix, table_rows

    spec = load_spec(matrix_file) if matrix_file is not None else None
    overrides: dict[str, Any] = {
        "targets": _list(target), "precisions": _list(precision), "devices": _list(device),
        "checkpoints": tuple(checkpoint) if checkpoint else None, "presets": tuple(preset) if preset else None,
        "options": _target_options(option) if option else None, "max_context": max_context,
        "validate": validate, "latency": latency}
    given = {k: v for k, v in overrides.items() if v is not None}
    if spec is None:
        if "targets" not in given:
            raise UserError("give a MATRIX.toml or --target a,b")
        spec = MatrixSpec(**given)
    else:
        import dataclasses
        spec = dataclasses.replace(spec, **given)
    if memory_budget is not None and memory_budget <= 0:
        raise UserError(f"--memory-budget must be a positive number of GiB, got {memory_budget}")
    req = MatrixRequest(spec=spec, out=out_dir, executor=executor, address=address, rebuild=rebuild,
                        memory_budget=int(memory_budget * 2**30) if memory_budget else None, workers=jobs,
                        retries=retries, schedule_timeout=schedule_timeout, use_cache=cache)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), console=err, disable=json_out or not err.is_terminal)
    tasks: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        job = event["job"]
        if job not in tasks:
            tasks[job] = bar.add_task(job, total=1.0)
        if "done" in event:
            bar.update(tasks[job], description=f"{job}: {event['done']['status']}", completed=1.0)
            bar.stop_task(tasks[job])
        else:
            bar.update(tasks[job], description=f"{job}: {event['message'][:40]}", completed=event["fraction"])

    with bar:
        summary = run_matrix(req, on_event)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        table = Table("job", "status", "validation", "size MB", "peak RSS MB", "wall s", "decode ms", "note")
        for cells in table_rows(summary["jobs"]):
            table.add_row(cells[0], cells[1], cells[2], cells[5], cells[6], cells[7], cells[9], cells[10])
        out.print(table)
        out.print(f"{len(summary['jobs'])} jobs in {summary['wall_s']} s; wrote {out_dir}/matrix.json, matrix.md"
                  + (", matrix.png" if (out_dir / "matrix.png").exists() else ""))
    code = exit_code(summary)
    if code:
        raise typer.Exit(code)


@report_app.command("merge")
@guarded
def merge_cmd(
    reports: Annotated[list[Path], typer.Argument(help="report.json files (or artifact folders holding one), one per device run.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for merged.json, merged.md, merged.csv, merged.png.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print merged.json.")] = False,
) -> None:
    """One cross-device table keyed by artifact id: a row per artifact, a cell per device, each with
    its level (device, mil-reference, onnx-proxy) and the machine's fingerprint."""
    from pipeline.reports import merge, write_merged

    merged = merge(reports)
    write_merged(merged, out_dir)
    if json_out:
        print(json.dumps(merged, indent=2))
    else:
        out.print((out_dir / "merged.md").read_text())


@report_app.command("diff")
@guarded
def diff_cmd(
    old: Annotated[Path, typer.Argument(help="Earlier report.json, artifact folder or merged.json.")],
    new: Annotated[Path, typer.Argument(help="Later one, of the same artifact(s).")],
    threshold: Annotated[list[str] | None, typer.Option(help="metric=fraction (relative change allowed before it counts), by metric name or group (latency, kl, max_abs, same_top_pct); repeatable.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the diff as JSON.")] = False,
) -> None:
    """Regressions and progressions per metric (parity and latency) between two runs of the same
    artifact; exit 3 when a regression is past its threshold."""
    from pipeline.reports import diff, parse_thresholds, render_diff

    result = diff(old, new, parse_thresholds(threshold or []))
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        out.print(render_diff(result), end="")
    if result["regressions"]:
        first = result["regressions"][0]
        err.print(f"error: {len(result['regressions'])} regression(s) past threshold, first: {first['metric']} "
                  f"{first['old']:.4g} -> {first['new']:.4g} ({first['change']})")
        raise typer.Exit(3)
