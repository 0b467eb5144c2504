"""The ONNX Runtime lowered-graph cache: a hit writes the same bytes as lowering afresh, an entry is
used only when this user wrote it and it is what it claims, and a program that is not its spec's
is never answered with that spec's graph."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.config import preset
from exporter.trace import TracedProgram, TraceSpec, trace
from mistral_export.cli import configure_logging
from tests.conftest import cli_run as run

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

TINY = preset("tiny")
FILES = ("model.onnx", "model.onnx.data", "genai_config.json")


pytestmark = pytest.mark.usefixtures("_cache")  # each test its own cache root (conftest)


def build(out: Path, *extra: str) -> Any:
    return run("build", "--target", "onnxruntime", "--out", str(out), *extra)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One clean build per module: its cache (trace and graph entries) and its artifact."""
    base = tmp_path_factory.mktemp("seeded")
    with pytest.MonkeyPatch.context() as mp:
        configure_logging()
        mp.setenv("MISTRAL_EXPORT_CACHE", str(base / "cache"))
        assert not warnings_of(build(base / "clean", "--no-validate"))
    return base / "cache", base / "clean"


def from_seed(seeded: tuple[Path, Path], root: Path) -> Path:
    """This test's own copy of the seeded cache (modes kept), and the clean artifact it came with."""
    shutil.copytree(seeded[0], root)
    return seeded[1]


def graph_cache(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["target"]["graph_cache"]


def digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}


def warnings_of(result: Any) -> list[str]:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("warning:")]


def entry(root: Path) -> tuple[Path, Path]:
    graphs = sorted((root / "onnx-graphs").glob("*.onnx"))
    assert len(graphs) == 1, graphs
    return graphs[0], graphs[0].with_name(graphs[0].name.removesuffix(".onnx") + ".meta.json")


def reseal(graph: Path, sidecar: Path, edit: Any) -> None:
    """Edit the sidecar and record the graph's current hash: an entry consistent with itself."""
    meta = json.loads(sidecar.read_text())
    edit(meta)
    meta["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))


def test_a_hit_writes_the_bytes_of_a_fresh_lowering(tmp_path: Path, _cache: Path) -> None:
    assert not warnings_of(build(tmp_path / "first", "--no-validate"))
    assert graph_cache(tmp_path / "first") == "miss"
    graph, sidecar = entry(_cache)
    assert oct(graph.parent.stat().st_mode & 0o777) == "0o700" and oct(graph.stat().st_mode & 0o777) == "0o600"
    # int4 binds the same graph differently (MatMulNBits): a hit, byte-identical to a build without caches.
    hit = build(tmp_path / "hit", "--precision", "int4")
    assert not warnings_of(hit) and "validation: passed" in hit.output
    assert graph_cache(tmp_path / "hit") == "hit"
    fresh = build(tmp_path / "fresh", "--precision", "int4", "--no-cache", "--no-validate")
    assert not warnings_of(fresh) and graph_cache(tmp_path / "fresh") == "off"
    assert digests(tmp_path / "hit") == digests(tmp_path / "fresh")
    assert sorted(p.name for p in graph.parent.iterdir()) == sorted([graph.name, sidecar.name])


@pytest.mark.parametrize("defect", ["flipped-byte", "group-writable", "unknown-weight", "wrong-shape",
                                    "missing-weight", "other-spec", "not-protobuf"])
def test_an_entry_that_is_not_what_it_claims_is_a_miss(tmp_path: Path, _cache: Path, defect: str,
                                                       seeded: tuple[Path, Path]) -> None:
    clean = from_seed(seeded, _cache)
    graph, sidecar = entry(_cache)
    names = "model.layers.0.self_attn.o_proj.weight"
    if defect == "flipped-byte":
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 1
        graph.write_bytes(bytes(data))
    elif defect == "group-writable":
        graph.chmod(0o664)
    elif defect == "not-protobuf":
        graph.write_bytes(b"\xff" * 64)
        reseal(graph, sidecar, lambda meta: None)
    else:
        def edit(meta: dict[str, Any]) -> None:
            weights = meta["weights"]
            key = next(k for k, v in weights.items() if v == [names])
            if defect == "unknown-weight":
                weights[key] = ["model.layers.9.self_attn.o_proj.weight"]
            elif defect == "wrong-shape":
                weights[key] = ["model.embed_tokens.weight"]
                del weights[next(k for k, v in weights.items() if v == ["model.embed_tokens.weight"])]
            elif defect == "missing-weight":
                del weights[key]
            else:
                meta["spec"]["settings"]["capacity"] += 1
        reseal(graph, sidecar, edit)
    result = build(tmp_path / "again", "--no-validate")
    found = warnings_of(result)
    reason = {"flipped-byte": "does not match the sha256", "group-writable": "was not written by this user",
              "unknown-weight": "that the graph or the program does not have", "wrong-shape": "has shape",
              "missing-weight": "not the program's parameters", "other-spec": "written for another spec",
              "not-protobuf": "graph cache entry"}[defect]
    assert len(found) == 1 and reason in found[0] and "lowering afresh" in found[0], found
    assert graph_cache(tmp_path / "again") == "miss"
    assert digests(tmp_path / "again") == digests(clean)
    assert not warnings_of(build(tmp_path / "healed", "--no-validate"))  # the entry was rewritten
    assert graph_cache(tmp_path / "healed") == "hit"


def test_a_folder_others_could_write_is_not_used(tmp_path: Path, _cache: Path,
        seeded: tuple[Path, Path]) -> None:
    from_seed(seeded, _cache)
    graph, _ = entry(_cache)
    graph.parent.chmod(0o777)
    found = warnings_of(build(tmp_path / "again", "--no-validate"))
    assert len(found) == 1 and "onnx-graphs cache disabled" in found[0] and "writable by other users" in found[0]
    assert graph_cache(tmp_path / "again") == "off"
    if os.geteuid() == 0:
        graph.parent.chmod(0o700)
        os.chown(graph.parent, 4242, -1)
        found = warnings_of(build(tmp_path / "foreign", "--no-validate"))
        assert len(found) == 1 and "owned by uid 4242" in found[0]


def test_a_program_that_is_not_its_specs_misses_the_specs_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                _cache: Path, seeded: tuple[Path, Path]) -> None:
    """The key is the program's content, not its trace spec: a wrong program under the right spec (a
    planted window defect) is lowered afresh, so validation sees it and fails (exit 3)."""
    from_seed(seeded, _cache)
    wrong = trace(TraceSpec(dataclasses.replace(TINY, sliding_window=TINY.sliding_window - 1),
                            TINY.sliding_window, torch.float32))
    monkeypatch.setattr("pipeline.build.traced",
                        lambda spec, use_cache=True: TracedProgram(spec, True, 0.0, program=wrong))
    result = build(tmp_path / "wrong")
    assert result.exit_code == 3 and "validation: failed" in result.output
    assert len(list((_cache / "onnx-graphs").glob("*.onnx"))) == 2  # its own entry; the clean one untouched


def test_swapped_weight_names_in_a_sealed_entry_fail_validation(tmp_path: Path, _cache: Path,
        seeded: tuple[Path, Path]) -> None:
    """A same-user entry that swaps two weights of equal shape passes every check the cache can make
    (as a same-user trace entry could); validation's eager reference catches it."""
    from_seed(seeded, _cache)
    graph, sidecar = entry(_cache)

    def swap(meta: dict[str, Any]) -> None:
        weights = meta["weights"]
        a, b = (next(k for k, v in weights.items() if v == [f"model.layers.{i}.self_attn.o_proj.weight"])
                for i in (0, 1))
        weights[a], weights[b] = weights[b], weights[a]

    reseal(graph, sidecar, swap)
    result = build(tmp_path / "swapped")
    assert result.exit_code == 3 and "validation: failed" in result.output
    assert graph_cache(tmp_path / "swapped") == "hit"


def test_a_cache_that_cannot_be_written_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       _cache: Path, seeded: tuple[Path, Path]) -> None:
    """A full disk while the entry is written: the build goes on, with the clean bytes and one warning."""
    clean = from_seed(seeded, _cache)
    for path in (_cache / "onnx-graphs").iterdir():
        path.unlink()  # this test's own copy; the trace entry stays, so only the graph is written

    def full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("exporter.trace_cache.write_atomic", full)
    found = warnings_of(build(tmp_path / "full", "--no-validate"))
    assert len(found) == 1 and "could not write the graph cache" in found[0] and "No space left" in found[0], found
    assert graph_cache(tmp_path / "full") == "miss"
    assert digests(tmp_path / "full") == digests(clean)
    assert not list((_cache / "onnx-graphs").iterdir())


def test_a_hit_never_deserializes_the_program(tmp_path: Path, _cache: Path, seeded: tuple[Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Both caches warm: the graph is found by the digest of the trace entry's bytes, and the program
    (seconds at 155M) is never loaded; the bytes are the clean build's."""
    clean = from_seed(seeded, _cache)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the program was deserialized")

    monkeypatch.setattr("exporter.program_file.loads", refuse)
    assert not warnings_of(build(tmp_path / "hit", "--no-validate"))
    assert graph_cache(tmp_path / "hit") == "hit"
    assert json.loads((tmp_path / "hit" / "manifest.json").read_text())["trace"]["cache_hit"]
    assert digests(tmp_path / "hit") == digests(clean)


def test_a_trace_entry_that_fails_its_check_is_traced_afresh_before_lowering(
        tmp_path: Path, _cache: Path, seeded: tuple[Path, Path]) -> None:
    """A sealed trace entry holding another config's program: its digest finds no graph, loading it
    fails the program check (one warning), and the fresh trace is lowered, recorded as built."""
    from exporter import program_file

    clean = from_seed(seeded, _cache)
    [sidecar] = (_cache / "programs").glob("*.meta.json")
    graph = sidecar.with_name(sidecar.name.replace(".meta.json", ".program.json"))
    other = trace(TraceSpec(dataclasses.replace(TINY, sliding_window=TINY.sliding_window - 1),
                            TINY.sliding_window, torch.float32))
    graph.write_bytes(program_file.dumps(other))
    reseal(graph, sidecar, lambda meta: None)
    result = build(tmp_path / "art", "--no-validate")
    assert any("trace cache entry" in w and "tracing afresh" in w for w in warnings_of(result))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert not manifest["trace"]["cache_hit"] and manifest["target"]["graph_cache"] == "miss"
    assert digests(tmp_path / "art") == digests(clean)
    # The entry was replaced by the fresh trace: the next build is a clean hit.
    assert not warnings_of(build(tmp_path / "again", "--no-validate"))
