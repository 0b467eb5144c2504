"""The OpenVINO lowered-graph cache: a hit writes the bytes of converting afresh (for another precision
of the same program too), and an entry whose weight inputs are not the program's is a miss. The rules
an entry shares with every cache (owner, mode, sha256, spec) are tested on the ONNX Runtime one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_run as run

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'mistral-export[openvino]')")
FILES = ("openvino_model.xml", "openvino_model.bin")


pytestmark = pytest.mark.usefixtures("_cache")  # each test its own cache root (conftest)


def build(out: Path, *extra: str) -> list[str]:
    """Build the tiny preset; the warnings it printed."""
    result = run("build", "--target", "openvino", "--out", str(out), "--no-validate", *extra)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("warning:")]


def graph_cache(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["target"]["graph_cache"]


def digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}


def test_a_hit_writes_the_bytes_of_a_fresh_conversion(tmp_path: Path, _cache: Path) -> None:
    assert not build(tmp_path / "first") and graph_cache(tmp_path / "first") == "miss"
    [entry] = (_cache / "openvino-graphs").glob("*.ir")
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    # int8 binds the same converted model through NNCF: a hit, byte-identical to a build without caches.
    assert not build(tmp_path / "hit", "--precision", "int8") and graph_cache(tmp_path / "hit") == "hit"
    assert not build(tmp_path / "fresh", "--precision", "int8", "--no-cache") and graph_cache(tmp_path / "fresh") == "off"
    assert digests(tmp_path / "hit") == digests(tmp_path / "fresh")


def test_an_entry_with_other_weight_inputs_is_a_miss(tmp_path: Path, _cache: Path) -> None:
    from targets.openvino import graph_cache as cache_module

    assert not build(tmp_path / "first")
    [entry] = (_cache / "openvino-graphs").glob("*.ir")
    sidecar = entry.with_name(entry.name.removesuffix(".ir") + ".meta.json")
    # A consistent entry (hash resealed) whose model lost a weight input: its checks must refuse it.
    model = cache_module._unpack(entry.read_bytes())
    victim = next(p for p in model.get_parameters() if p.output(0).get_any_name() == "weight:model.norm.weight")
    victim.output(0).get_tensor().set_names({"norm_scale"})
    entry.write_bytes(cache_module._pack(model))
    meta: dict[str, Any] = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(entry.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))
    warnings = build(tmp_path / "again")
    assert len(warnings) == 1 and "weight inputs are not the program's parameters" in warnings[0]
    assert graph_cache(tmp_path / "again") == "miss"
    assert not build(tmp_path / "healed") and graph_cache(tmp_path / "healed") == "hit"  # rewritten whole
