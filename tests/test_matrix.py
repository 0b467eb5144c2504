"""Build matrices: a 2 x 2 tiny matrix on the local executor and on a local Ray cluster give the same
artifacts; a rerun skips every job; a job no node can run is reported unschedulable; a killed
worker's job is retried and leaves nothing half-written; report merge and diff."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_run, one_line_error

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mistral-export[ray]')")

TARGETS, PRECISIONS = "onnxruntime,openvino", "fp32,int8"
# Files whose bytes carry timings or dates; every other file of an artifact is compared byte for byte.
TIMED = {"report.json", "report.md", "parity.png", "latency.png", "manifest.json"}


def matrix(out: Path, checkpoint: Path, *extra: str) -> tuple[Any, dict[str, Any]]:
    result = cli_run("matrix", "--target", TARGETS, "--precision", PRECISIONS, "--checkpoint", str(checkpoint),
                     "--out", str(out), "--json", *extra)
    return result, json.loads(result.stdout[result.stdout.index("{"):]) if "{" in result.stdout else {}


def files(artifact: Path) -> dict[str, str]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return {f["path"]: f["sha256"] for f in manifest["files"] if f["path"] not in TIMED}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session's trace cache for the module-scoped runs (set before the per-test fixture runs), so no
    job reads the user's own cache."""
    saved = os.environ.get("MISTRAL_EXPORT_CACHE")
    os.environ["MISTRAL_EXPORT_CACHE"] = str(tmp_path_factory.getbasetemp() / "trace-cache")
    yield
    if saved is None:
        os.environ.pop("MISTRAL_EXPORT_CACHE", None)
    else:
        os.environ["MISTRAL_EXPORT_CACHE"] = saved


@pytest.fixture(scope="module")
def cluster(session_cache: Any) -> Any:
    """A local Ray cluster of 2 CPUs; its workers share the session's trace cache."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(session_cache: Any, tmp_path_factory: pytest.TempPathFactory,
              calibration_tiny: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("matrix-local")
    result, summary = matrix(out, calibration_tiny, "--executor", "local")
    assert result.exit_code == 0, result.output
    return out, summary


@pytest.fixture(scope="module")
def ray_run(cluster: Any, tmp_path_factory: pytest.TempPathFactory, calibration_tiny: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("matrix-ray")
    result, summary = matrix(out, calibration_tiny, "--executor", "ray")
    assert result.exit_code == 0, result.output
    return out, summary


def test_local_matrix_builds_validates_and_reports_every_job(local_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = local_run
    rows = summary["jobs"]
    assert [r["status"] for r in rows] == ["built"] * 4 and summary["counts"] == {"built": 4}
    assert {(r["target"], r["precision"]) for r in rows} == {(t, p) for t in TARGETS.split(",")
                                                            for p in PRECISIONS.split(",")}
    for r in rows:
        artifact = Path(r["artifact"])
        manifest = json.loads((artifact / "manifest.json").read_text())
        assert manifest["job"]["key"] == r["key"] and artifact.name.endswith(r["key"][:12])
        assert r["validation"] == "passed" and r["level"] == "device" and r["fidelity"]["status"] == "passed"
        assert r["size_bytes"] == sum(f["bytes"] for f in manifest["files"])
        assert r["decode_ms"] > 0 and r["ttft_ms"] > 0 and 100 < r["peak_rss_mb"] < 8000 and r["wall_s"] > 0
        if r["precision"] == "int8":
            assert r["quality"]["status"] == "passed" and r["quality"]["mean_kl"] > 0
    on_disk = json.loads((out / "matrix.json").read_text())
    assert on_disk["jobs"] == rows
    table = (out / "matrix.md").read_text()
    assert all(r["job"] in table for r in rows)
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(out) == []


def test_ray_matrix_gives_the_local_executors_artifacts(local_run: tuple[Path, dict[str, Any]],
                                                        ray_run: tuple[Path, dict[str, Any]]) -> None:
    (local_out, local), (ray_out, remote) = local_run, ray_run
    assert remote["executor"] == "ray" and [r["status"] for r in remote["jobs"]] == ["built"] * 4
    for a, b in zip(local["jobs"], remote["jobs"]):
        assert a["key"] == b["key"] and Path(a["artifact"]).name == Path(b["artifact"]).name
        assert files(Path(a["artifact"])) == files(Path(b["artifact"]))
        ma, mb = (json.loads((Path(r["artifact"]) / "manifest.json").read_text()) for r in (a, b))
        for section in ("model", "target", "io", "cache", "job"):
            assert ma[section] == mb[section], section
        assert b["validation"] == "passed" and b["decode_ms"] > 0
        # The same files give the same artifact id in both reports.
        ids = [json.loads((Path(r["artifact"]) / "report.json").read_text())["artifact"]["id"] for r in (a, b)]
        assert ids[0] == ids[1]
    assert leftovers(ray_out) == []


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_second_run_skips_every_job(executor: str, local_run: tuple[Path, dict[str, Any]],
                                      ray_run: tuple[Path, dict[str, Any]], calibration_tiny: Path) -> None:
    out = local_run[0] if executor == "local" else ray_run[0]
    before = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    result, summary = matrix(out, calibration_tiny, "--executor", executor)
    assert result.exit_code == 0 and summary["counts"] == {"skipped": 4}
    assert all(r["validation"] == "passed" for r in summary["jobs"])
    assert before == {p.name: (p / "manifest.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}


def test_a_tampered_or_rekeyed_artifact_is_rebuilt_not_skipped(local_run: tuple[Path, dict[str, Any]],
                                                               tmp_path: Path) -> None:
    from pipeline.jobs import Job, current

    row = local_run[1]["jobs"][0]
    copy = tmp_path / Path(row["artifact"]).name
    shutil.copytree(row["artifact"], copy)
    job = Job(id=row["job"], kind="build", target=row["target"], precision=row["precision"], device=row["device"],
              model=row["model"], checkpoint=None, preset=None, options={}, max_context=2048, validate=True,
              latency=True, key=row["key"], artifact=str(copy), memory_bytes=1, resource=None)
    assert current(job) is None
    assert "job key differs" in current(Job(**{**job.to_dict(), "key": "0" * 64}))
    model = next(p for p in copy.iterdir() if p.suffix in (".onnx", ".xml"))
    model.write_bytes(model.read_bytes() + b" ")
    assert current(job).startswith("rebuilding:")


def test_a_job_that_needs_a_missing_resource_is_unschedulable_and_the_others_finish(cluster: Any, tmp_path: Path,
                                                                                  calibration_tiny: Path) -> None:
    from pipeline.executors import run_ray
    from pipeline.jobs import MatrixSpec, expand

    jobs, _ = expand(MatrixSpec(targets=("reference",), checkpoints=(str(calibration_tiny),), validate=False,
                                latency=False), tmp_path)
    mac = [dict(jobs[0].to_dict(), id="needs-a-mac", resource="macos", artifact=str(tmp_path / "mac"))]
    from pipeline.jobs import Job

    started = time.monotonic()
    rows = run_ray([[Job.from_dict(mac[0])], [jobs[0]]], lambda event: None, None, retries=0, schedule_timeout=3)
    took = time.monotonic() - started
    by_id = {r["job"]: r for r in rows}
    assert by_id["needs-a-mac"]["status"] == "unschedulable"
    assert by_id["needs-a-mac"]["error"] == "needs resource macos: no node of the cluster has it"
    assert by_id[jobs[0].id]["status"] == "built" and took < 120
    assert not (tmp_path / "mac").exists()


def test_local_executor_reports_what_this_machine_cannot_run(tmp_path: Path, calibration_tiny: Path) -> None:
    result, summary = matrix(tmp_path, calibration_tiny, "--memory-budget", "0.01", "--no-validate")
    assert result.exit_code == 2
    assert {r["status"] for r in summary["jobs"]} == {"unschedulable"}
    assert all("the budget is 0.0 GiB (--memory-budget)" in r["error"] for r in summary["jobs"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.json", "matrix.md"]


def test_a_killed_workers_job_is_retried_and_leaves_nothing_half_written(cluster: Any, tmp_path: Path,
                                                                        calibration_tiny: Path) -> None:
    out = tmp_path / "m"
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(zip(("result", "summary"), cli_run_json(out, calibration_tiny))))
    worker.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and worker.is_alive():
        for entry in (out.iterdir() if out.exists() else []):
            if ".partial-" in entry.name:
                pid = int(entry.name.split(".partial-", 1)[1].rsplit("-", 2)[1])
                os.kill(pid, signal.SIGKILL)
                killed = (pid, entry.name)
                break
        time.sleep(0.05)
    worker.join(300)
    assert killed is not None, "the job's staging folder never appeared"
    summary = box["summary"]
    (row,) = summary["jobs"]
    assert row["status"] == "built" and row["validation"] == "passed", row
    assert row["pid"] != killed[0]  # a new worker did the job again
    assert leftovers(out) == [], f"half-written leftovers after the retry (killed pid {killed[0]})"
    from exporter.manifest import read_manifest

    manifest = read_manifest(Path(row["artifact"]))  # every file's hash checked
    assert manifest["job"]["key"] == row["key"]


def cli_run_json(out: Path, checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    result = cli_run("matrix", "--target", "onnxruntime", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--executor", "ray", "--retries", "2", "--no-latency", "--json")
    return result, json.loads(result.stdout[result.stdout.index("{"):])


def test_matrix_input_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "m.toml"
    bad.write_text("targets = [\"onnxruntime\"\n")
    one_line_error(cli_run("matrix", str(bad), "--out", str(tmp_path / "o")), "is not valid TOML")
    bad.write_text('targets = ["onnxruntime"]\nprecission = ["fp32"]\n')
    one_line_error(cli_run("matrix", str(bad), "--out", str(tmp_path / "o")), "unknown key(s) ['precission']")
    one_line_error(cli_run("matrix", "--out", str(tmp_path / "o")), "give a MATRIX.toml or --target a,b")
    one_line_error(cli_run("matrix", "--target", "onnxruntime", "--option", "block_size=64"), "target:key=value")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "matrix.json").write_text('{"mine": true}')
    one_line_error(cli_run("matrix", "--target", "onnxruntime", "--out", str(foreign)), "is not a mistral-export matrix")
    assert json.loads((foreign / "matrix.json").read_text()) == {"mine": True}
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "matrix.md").write_text("my notes")
    one_line_error(cli_run("matrix", "--target", "onnxruntime", "--out", str(notes)), "is not a mistral-export matrix")
    assert (notes / "matrix.md").read_text() == "my notes"


def test_unsupported_pairs_are_listed_not_run(tmp_path: Path, calibration_tiny: Path) -> None:
    from pipeline.jobs import MatrixSpec, expand

    jobs, unsupported = expand(MatrixSpec(targets=("reference", "coreml"), precisions=("fp32", "int4"),
                                          checkpoints=(str(calibration_tiny),)), tmp_path)
    assert {(j.target, j.precision, j.kind) for j in jobs} == {
        ("reference", "fp32", "build"), ("coreml", "fp32", "build"), ("coreml", "int4", "build"),
        ("coreml", "fp32", "check"), ("coreml", "int4", "check")}
    assert all(j.resource == "macos" for j in jobs if j.kind == "check")
    (row,) = unsupported
    assert row["status"] == "unsupported" and "does not support precision 'int4'" in row["error"]


def test_the_key_follows_every_input(tmp_path: Path, calibration_tiny: Path) -> None:
    from pipeline.jobs import MatrixSpec, expand

    def key(**kw: Any) -> str:
        spec = MatrixSpec(**{"targets": ("onnxruntime",), "checkpoints": (str(calibration_tiny),), **kw})
        return expand(spec, tmp_path)[0][0].key

    base = key()
    assert base == key()
    variants = [key(options={"onnxruntime": {"block_size": "64"}}), key(latency=False), key(max_context=1024),
                key(precisions=("fp16",)), key(checkpoints=(), presets=("tiny",))]
    assert len({base, *variants}) == 6


# ---- report merge and diff ------------------------------------------------------------------------

def _report(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(row["artifact"]) / "report.json").read_text())


def test_merge_lines_up_one_artifact_across_devices(local_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    rows = local_run[1]["jobs"]
    here = _report(rows[0])
    # The same artifact as a Mac would report it: another machine, another level.
    there = json.loads(json.dumps(here))
    there["fingerprint"]["cpu"], there["parity"]["level"] = "Apple M3", "mil-reference"
    (tmp_path / "mac.json").write_text(json.dumps(there))
    result = cli_run("report", "merge", rows[0]["artifact"], str(tmp_path / "mac.json"), rows[2]["artifact"],
                     "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "merged" / "merged.json").read_text())
    by_id = {e["id"]: e for e in merged["artifacts"]}
    assert len(by_id) == 2 and here["artifact"]["id"] in by_id
    cells = by_id[here["artifact"]["id"]]["cells"]
    assert {c["level"] for c in cells.values()} == {"device", "mil-reference"} and len(cells) == 2
    assert any("Apple M3" in d for d in cells)
    csv_lines = (tmp_path / "merged" / "merged.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 and "latency.decode_ms" in csv_lines[0]
    assert (tmp_path / "merged" / "merged.png").exists() and "Apple M3" in (tmp_path / "merged" / "merged.md").read_text()
    twice = cli_run("report", "merge", rows[0]["artifact"], rows[0]["artifact"], "--out", str(tmp_path / "x"))
    one_line_error(twice, "two reports of artifact")


def test_diff_exits_3_on_a_planted_regression_and_names_the_metric(local_run: tuple[Path, dict[str, Any]],
                                                                   tmp_path: Path) -> None:
    row = local_run[1]["jobs"][1]
    old = _report(row)
    same = cli_run("report", "diff", row["artifact"], row["artifact"])
    assert same.exit_code == 0 and "0 regression(s)" in same.output
    slow = json.loads(json.dumps(old))
    slow["latency"]["decode"][0]["median_ms"] *= 1.5
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    result = cli_run("report", "diff", row["artifact"], str(tmp_path / "slow.json"))
    fill = old["latency"]["decode"][0]["fill"]
    assert result.exit_code == 3 and f"latency.decode_ms[{fill}]" in result.output and "+50.0%" in result.output
    assert cli_run("report", "diff", row["artifact"], str(tmp_path / "slow.json"), "--threshold", "latency=0.6").exit_code == 0
    back = cli_run("report", "diff", str(tmp_path / "slow.json"), row["artifact"], "--json")
    assert back.exit_code == 0 and json.loads(back.stdout)["progressions"][0]["metric"] == f"latency.decode_ms[{fill}]"
    worse = json.loads(json.dumps(old))
    worse["parity"]["quality"]["corpus"]["mean_kl"] = old["parity"]["quality"]["corpus"]["mean_kl"] * 3 + 1e-3
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    result = cli_run("report", "diff", row["artifact"], str(tmp_path / "worse.json"))
    assert result.exit_code == 3 and "quality.corpus.mean_kl" in result.output
    other = local_run[1]["jobs"][2]["artifact"]
    one_line_error(cli_run("report", "diff", row["artifact"], other), "different artifacts")
    (tmp_path / "junk.json").write_text("[1, 2]")
    one_line_error(cli_run("report", "diff", row["artifact"], str(tmp_path / "junk.json")), "is not a mistral-export")
