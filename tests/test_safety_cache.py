"""The trace cache and program files never run planted code, never hand back a program of another
spec, are used only when this user wrote them, and never fail a build."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from exporter import program_file, trace_cache
from exporter.config import preset
from exporter.manifest import read_manifest, write_manifest
from exporter.trace import TracedProgram, TraceSpec, save_program, trace
from mistral_export.cli import configure_logging
from tests.conftest import cli_run as run

cli = CliRunner()
TINY = preset("tiny")
SPEC = TraceSpec(TINY, TINY.sliding_window, torch.float32)  # what `build --target reference` traces


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    configure_logging()  # the CLI's one-line warnings, as `mistral-export` installs them
    root = tmp_path / "cache"
    monkeypatch.setenv("MISTRAL_EXPORT_CACHE", str(root))
    return root


def build(out: Path, *extra: str) -> Any:
    return run("build", "--target", "reference", "--out", str(out), *extra)


def one_warning(result: Any, needle: str) -> None:
    """The build went on (exit 0) and said why in exactly one plain warning line, with no traceback."""
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert result.exit_code == 0, result.output
    assert len(warnings) == 1 and needle in warnings[0], warnings
    assert "Traceback" not in result.output


def entry_paths(root: Path) -> tuple[Path, Path]:
    return root / "programs" / f"{SPEC.key()}.program.json", root / "programs" / f"{SPEC.key()}.meta.json"


class _Payload:
    """Unpickling this creates `marker`: the code a crafted file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def crafted_pt2(path: Path, marker: Path) -> Path:
    """A valid .pt2 whose first weight is a pickle that runs code, as torch.export.load would read it."""
    clean = path.with_suffix(".clean.pt2")
    save_program(trace(SPEC), clean)
    with zipfile.ZipFile(clean) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    config_entry = next(i for i, (info, _) in enumerate(entries) if info.filename.endswith("model_weights_config.json"))
    config = json.loads(entries[config_entry][1])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[config_entry] = (entries[config_entry][0], json.dumps(config).encode())
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in entries:
            is_weight = info.filename.endswith(f"/weights/{first['path_name']}")
            dst.writestr(info, payload.getvalue() if is_weight else data)
    return path


def test_the_crafted_file_does_run_code_through_torch_export_load(tmp_path: Path) -> None:
    """The planted file is real: torch.export.load executes it (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    bad = crafted_pt2(tmp_path / "bad.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(bad)
    assert marker.exists()


def test_planted_pickle_in_the_cache_or_an_artifact_never_runs(tmp_path: Path, _cache: Path) -> None:
    marker = tmp_path / "pwned"
    bad = crafted_pt2(tmp_path / "bad.pt2", marker)
    graph, sidecar = entry_paths(_cache)
    graph.parent.mkdir(parents=True, mode=0o700)
    (graph.parent / f"{SPEC.key()}.pt2").write_bytes(bad.read_bytes())  # where older versions looked
    graph.write_bytes(bad.read_bytes())
    sidecar.write_text(json.dumps({"format": trace_cache.FORMAT, "spec": SPEC.describe(),
                                   "sha256": hashlib.sha256(graph.read_bytes()).hexdigest()}))
    result = build(tmp_path / "art")
    assert result.exit_code == 0 and "trace built" in result.output and "validation: passed" in result.output
    assert "warning: trace cache entry" in result.output and "tracing afresh" in result.output
    assert not marker.exists()
    # The same file as the reference artifact's own program: read without unpickling anything.
    art = tmp_path / "art"
    (art / "program.pt2").write_bytes(bad.read_bytes())
    write_manifest(art, read_manifest(art, verify=False))
    assert run("generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4").exit_code == 0
    assert run("validate", str(art), "--no-latency").exit_code == 0
    assert not marker.exists()


def _forge(root: Path, program: Any, spec: dict) -> None:
    graph, sidecar = entry_paths(root)
    graph.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = program_file.dumps(program)
    graph.write_bytes(data)
    sidecar.write_text(json.dumps({"format": trace_cache.FORMAT, "spec": spec, "sha256": hashlib.sha256(data).hexdigest()}))


@pytest.mark.parametrize("lie", ["claims-this-spec", "other-spec"])
def test_a_program_of_another_config_at_the_key_is_a_miss(tmp_path: Path, _cache: Path, lie: str) -> None:
    other = TraceSpec(dataclasses.replace(TINY, sliding_window=TINY.sliding_window - 1), TINY.sliding_window,
                      torch.float32)
    _forge(_cache, trace(other), SPEC.describe() if lie == "claims-this-spec" else other.describe())
    result = build(tmp_path / "art")
    assert "trace built" in result.output and "validation: passed" in result.output
    one_warning(result, "attention window [15], expected 16" if lie == "claims-this-spec"
                else "written for another spec")
    again = build(tmp_path / "again", "--no-validate")  # the entry was rewritten: now a clean hit
    assert again.exit_code == 0 and "trace cache hit" in again.output and "warning" not in again.output


def test_entries_and_folders_others_could_write_are_not_trusted(tmp_path: Path, _cache: Path) -> None:
    assert build(tmp_path / "a", "--no-validate").exit_code == 0
    graph, sidecar = entry_paths(_cache)
    assert graph.is_file() and sidecar.is_file() and oct(graph.parent.stat().st_mode & 0o777) == "0o700"
    assert "trace cache hit" in build(tmp_path / "b", "--no-validate").output
    graph.chmod(0o666)
    result = build(tmp_path / "c", "--no-validate")
    one_warning(result, "was not written by this user")
    assert "trace built" in result.output
    graph.parent.chmod(0o777)
    result = build(tmp_path / "d", "--no-validate")
    one_warning(result, "writable by other users")
    assert "trace cache disabled" in result.output
    graph.parent.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(graph.parent, 4242, -1)
        one_warning(build(tmp_path / "e", "--no-validate"), "owned by uid 4242")


@pytest.mark.parametrize("kind", ["file", "proc", "full"])
def test_an_unusable_cache_never_fails_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    if kind == "file":
        (tmp_path / "cache-file").write_text("not a folder")
        monkeypatch.setenv("MISTRAL_EXPORT_CACHE", str(tmp_path / "cache-file"))
    elif kind == "proc":
        monkeypatch.setenv("MISTRAL_EXPORT_CACHE", "/proc/mistral-export-cache")
    else:
        class FullDisk:
            """The os module as trace_cache sees it, with a disk that fills at the final rename."""

            def __getattr__(self, name: str) -> object:
                return getattr(os, name)

            @staticmethod
            def replace(*args: object, **kwargs: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(trace_cache, "os", FullDisk())
    result = build(tmp_path / "art", "--no-validate")
    one_warning(result, {"file": "trace cache disabled", "proc": "trace cache disabled",
                         "full": "No space left on device"}[kind])
    root = Path(os.environ["MISTRAL_EXPORT_CACHE"])
    near = root if root.is_dir() else root.parent
    assert not [p for p in near.rglob("*") if "partial" in p.name] and (tmp_path / "art").is_dir()


def test_no_cache_holds_for_every_stage(tmp_path: Path, _cache: Path) -> None:
    target = "openvino"
    try:
        import openvino  # noqa: F401
    except ImportError:
        target = "reference"
    result = run("build", "--target", target, "--out", str(tmp_path / "art"), "--no-cache")
    assert result.exit_code == 0 and "validation: passed" in result.output
    assert not _cache.exists()  # no trace entry, no compiled blobs, nothing


def test_validation_catches_a_wrong_program_that_fooled_the_cache(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a wrong program ever pass the cache's checks, the artifact is built from it; validation's
    reference is the eager model, traced from nothing, so the gates fail (exit 3)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from exporter import trace as trace_module

    wrong = trace(TraceSpec(dataclasses.replace(TINY, sliding_window=TINY.sliding_window - 1),
                            TINY.sliding_window, torch.float32))
    real = trace_module.traced

    def fooled(spec: TraceSpec, use_cache: bool = True) -> Any:
        result = real(spec, use_cache)
        return TracedProgram(result.spec, True, result.seconds, program=wrong)

    monkeypatch.setattr("pipeline.build.traced", fooled)
    result = run("build", "--target", "onnxruntime", "--out", str(tmp_path / "art"))
    assert result.exit_code == 3 and "validation: failed" in result.output
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["parity"]["status"] == "failed"


def test_a_packed_entry_is_read_only_as_the_files_it_frames() -> None:
    """The lowered-graph caches' framing (a graph and its constants, tokenizer IRs): every length must
    lie inside the payload and the payload must end with the last file."""
    from targets.lowered_cache import pack_files, unpack_files

    files = [b"<net/>", b"", b"\x00" * 9]
    data = pack_files(files)
    assert unpack_files(data, 3) == files
    for bad, why in ((data[:-1], "is truncated"), (data[:5], "is truncated"), (data + b"x", "has trailing bytes"),
                     (pack_files(files[:2]), "is truncated"), (data, "has trailing bytes")):
        with pytest.raises(trace_cache.UnsafeCache, match=why):
            unpack_files(bad, 3 if bad is not data else 2)
    huge = (1 << 60).to_bytes(8, "little") + b"abc"  # a length far past the payload
    with pytest.raises(trace_cache.UnsafeCache, match="is truncated"):
        unpack_files(huge, 1)
