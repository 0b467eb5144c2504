"""What a build or a validation may write: --out that is not ours is refused untouched, concurrent
writers are locked out, validate is atomic, and nothing half-written is ever left behind."""

from __future__ import annotations

import errno
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter import staging
from tests.conftest import cli_run as run, hf_model, one_line_error, save_checkpoint





def build_ref(out: Path, *extra: str) -> object:
    return run("build", "--target", "reference", "--out", str(out), "--no-validate", *extra)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name
                  or (p.name.endswith(".lock") and p.name != ".lock"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    save_checkpoint(hf_model(), models / "base")
    (models / "sibling").mkdir()
    (models / "sibling" / "notes.txt").write_text("keep me")
    return models / "base"


@pytest.mark.parametrize("where", ["parent", "itself"])
def test_force_never_replaces_the_checkpoint_or_its_parent(checkpoint: Path, where: str) -> None:
    models = checkpoint.parent
    before = snapshot(models)
    out = models if where == "parent" else checkpoint
    result = run("build", "--target", "reference", "--checkpoint", str(checkpoint), "--out", str(out),
                 "--force", "--no-validate")
    one_line_error(result, "checkpoint")
    assert snapshot(models) == before and not leftovers(models) and not leftovers(models.parent)


def test_force_replaces_only_our_artifacts(tmp_path: Path) -> None:
    mine = tmp_path / "user-data"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_line_error(build_ref(mine, "--force"), "replaces only a mistral-export artifact")
    assert (mine / "thesis.tex").read_text() == "years of work"
    # A folder with a manifest.json that is not ours is not ours either.
    (mine / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": []}))
    one_line_error(build_ref(mine, "--force"), "replaces only a mistral-export artifact")
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "thesis.tex"]
    ours = tmp_path / "art"
    assert build_ref(ours).exit_code == 0
    assert build_ref(ours, "--force").exit_code == 0 and not leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["cwd", "home", "root", "file", "file-force"])
def test_out_that_is_not_an_artifact_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       kind: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work if kind == "home" else tmp_path / "home"))
    target = {"cwd": ".", "home": str(work), "root": "/", "file": "keep.txt", "file-force": "keep.txt"}[kind]
    extra = [] if kind == "file" else ["--force"]
    result = build_ref(Path(target), *extra)
    one_line_error(result, {"cwd": "current folder", "home": "home folder", "root": "root folder",
                            "file": "existing file", "file-force": "existing file"}[kind])
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"] and (work / "keep.txt").read_text() == "x"


def test_dangling_symlink_and_unwritable_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    one_line_error(build_ref(link), "symbolic link to a missing path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]
    for place in ("/proc/mistral-export-test", "/sys/mistral-export-test"):
        result = build_ref(Path(place))
        one_line_error(result, "choose a writable --out")
    # A read-only filesystem (root ignores permission bits, so the refusal itself is simulated here).
    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(staging.tempfile, "mkdtemp", read_only)
    one_line_error(build_ref(tmp_path / "ro"), "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_a_second_writer_is_locked_out(tmp_path: Path) -> None:
    out = tmp_path / "art"
    assert build_ref(out).exit_code == 0
    before = snapshot(out)
    with staging.output_lock(out):  # another writer holds the path (a separate open file description)
        one_line_error(build_ref(out, "--force"), f"being written by another mistral-export process (pid {os.getpid()})")
        one_line_error(run("validate", str(out), "--no-latency"), "being written by another")
    assert snapshot(out) == before
    assert build_ref(out, "--force").exit_code == 0 and not leftovers(tmp_path)


def test_sweep_removes_only_dead_processes_staging(tmp_path: Path) -> None:
    out = tmp_path / "art"
    dead = tmp_path / f".art.partial-{staging._HOST}-999999999-abc"
    alive = tmp_path / f".art.partial-{staging._HOST}-{os.getpid()}-abc"
    foreign = tmp_path / ".art.partial-otherhost-999999999-abc"
    other_name = tmp_path / f".artx.partial-{staging._HOST}-999999999-abc"
    for folder in (dead, alive, foreign, other_name):
        folder.mkdir()
        (folder / "model.bin").write_bytes(b"w" * 10)
    assert build_ref(out).exit_code == 0
    assert not dead.exists() and alive.exists() and foreign.exists() and other_name.exists()


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("validated") / "art"
    assert run("build", "--target", "reference", "--out", str(out)).exit_code == 0
    return out


def _half_written_reports(exc: BaseException) -> Callable[..., None]:
    def fail(folder: Path, rep: dict) -> None:
        (folder / "report.json").write_text("{half")
        raise exc
    return fail


def _raise(exc: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc
    return fail


DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["validate", "bench"])
@pytest.mark.parametrize("where,exc,code,needle", [
    ("validation.report.write_all", DISK_FULL, 2, "No space left on device; free space"),
    ("validation.report.write_all", KeyboardInterrupt(), 130, "interrupted"),
    ("exporter.artifact.write_manifest", DISK_FULL, 2, "No space left on device; free space"),
    ("exporter.staging.publish", DISK_FULL, 2, "No space left on device; free space"),
    ("exporter.staging.publish", KeyboardInterrupt(), 130, "interrupted"),
], ids=["reports-full", "reports-ctrl-c", "manifest-full", "swap-full", "swap-ctrl-c"])
def test_failed_or_interrupted_validate_and_bench_keep_the_old_reports(
        validated: Path, monkeypatch: pytest.MonkeyPatch, command: str, where: str, exc: BaseException,
        code: int, needle: str) -> None:
    """A disk-full or Ctrl-C while the reports, the manifest or the final swap are written: the
    artifact is byte for byte what it was, passes its integrity check, and nothing is left beside it."""
    module, _, name = where.rpartition(".")
    before = snapshot(validated)
    fail = _half_written_reports(exc) if name == "write_all" else _raise(exc)
    monkeypatch.setattr(importlib.import_module(module), name, fail)
    result = run(command, str(validated), *(["--no-latency"] if command == "validate" else []))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code and needle in lines[-1] and "Traceback" not in result.output, result.output
    after = snapshot(validated)
    assert sorted(after) == sorted(before) and [k for k in before if after[k] != before[k]] == []
    assert not leftovers(validated.parent)
    monkeypatch.undo()
    assert run("inspect", str(validated)).exit_code == 0


def test_validate_after_a_failure_writes_new_reports(validated: Path) -> None:
    assert run("validate", str(validated), "--no-latency").exit_code == 0
    assert run("inspect", str(validated)).exit_code == 0 and not leftovers(validated.parent)
    assert json.loads((validated / "report.json").read_text())["latency"]["status"] == "not-run"


def test_rewritten_reports_of_the_same_size_are_hashed_anew(validated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the next report.md has the old one's size but other bytes (as two bench runs' reports
    often do). The manifest must record its own hash, so the artifact still verifies afterwards."""
    from validation import report

    old = (validated / "report.md").read_bytes()
    real = report.write_all

    def same_size(folder: Path, rep: dict) -> None:
        real(folder, rep)
        report.write_new(folder / "report.md", bytes(reversed(old)))  # same bytes count, other content

    monkeypatch.setattr(report, "write_all", same_size)
    assert run("validate", str(validated), "--no-latency").exit_code == 0
    monkeypatch.undo()
    assert (validated / "report.md").read_bytes() == bytes(reversed(old))
    assert run("inspect", str(validated)).exit_code == 0  # every listed hash is the file's own
    assert run("validate", str(validated), "--no-latency").exit_code == 0


def test_report_symlinks_are_refused_and_outside_files_untouched(tmp_path: Path) -> None:
    out = tmp_path / "art"
    assert run("build", "--target", "reference", "--out", str(out)).exit_code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(secret)
    one_line_error(run("validate", str(out), "--no-latency"), "report.md is a symbolic link")
    assert secret.read_text() == "not yours"


def test_multi_target_build_respects_force_rules(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    parent = tmp_path / "many"
    (parent / "tiny-reference-fp32").mkdir(parents=True)
    (parent / "tiny-reference-fp32" / "mine.txt").write_text("x")
    result = run("build", "--target", "reference,onnxruntime", "--out", str(parent), "--force", "--no-validate",
                 "--json")
    assert result.exit_code == 2
    rows = {r["target"]: r for r in json.loads(result.stdout)["targets"]}
    assert rows["reference"]["status"] == "failed" and "replaces only" in rows["reference"]["error"]
    assert rows["onnxruntime"]["status"] == "built"
    assert (parent / "tiny-reference-fp32" / "mine.txt").read_text() == "x"
    assert not leftovers(parent)
