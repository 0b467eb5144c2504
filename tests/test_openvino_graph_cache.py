"""The OpenVINO lowered-graph and tokenizer caches: a hit writes the bytes of converting afresh (for
another precision of the same program too), and an entry whose weight inputs are not the program's, or
a tokenizer entry altered or cut short, is a miss. The rules
an entry shares with every cache (owner, mode, sha256, spec) are tested on the ONNX Runtime one."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_run as run

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'mistral-export[openvino]')")
FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_tokenizer.bin",
         "openvino_detokenizer.xml", "openvino_detokenizer.bin")
_COUNTER = re.compile(rb"(?<=[A-Za-z])_\d+")  # OpenVINO's per-process node counter in a node's name


pytestmark = pytest.mark.usefixtures("_cache")  # each test its own cache root (conftest)


def build(out: Path, *extra: str) -> list[str]:
    """Build the tiny preset; the warnings it printed."""
    result = run("build", "--target", "openvino", "--out", str(out), "--no-validate", *extra)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("warning:")]


def graph_cache(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["target"]["graph_cache"]


def digests(out: Path) -> dict[str, str]:
    """Each file's sha256; the tokenizer IRs' with the node counter masked (converting them names nodes
    by it, and a graph-cache hit creates fewer nodes before that than a fresh conversion)."""
    def masked(name: str) -> bytes:
        data = (out / name).read_bytes()
        return _COUNTER.sub(b"_N", data) if "tokenizer" in name and name.endswith(".xml") else data

    return {name: hashlib.sha256(masked(name)).hexdigest() for name in FILES}


def test_a_hit_writes_the_bytes_of_a_fresh_conversion(tmp_path: Path, _cache: Path) -> None:
    assert not build(tmp_path / "first") and graph_cache(tmp_path / "first") == "miss"
    [entry] = (_cache / "openvino-graphs").glob("*.ir")
    [tokenizers] = (_cache / "openvino-tokenizers").glob("*.irs")
    assert oct(entry.stat().st_mode & 0o777) == oct(tokenizers.stat().st_mode & 0o777) == "0o600"
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


def test_an_altered_or_cut_tokenizer_entry_is_a_miss(tmp_path: Path, _cache: Path) -> None:
    from targets.lowered_cache import pack_files
    from targets.openvino import tokenizer as tokenizer_module

    assert not build(tmp_path / "first")
    [entry] = (_cache / "openvino-tokenizers").glob("*.irs")
    sidecar = entry.with_name(entry.name.removesuffix(".irs") + ".meta.json")
    good = entry.read_bytes()
    entry.write_bytes(good.replace(b"<net ", b"<nEt ", 1))  # not resealed: its sha256 no longer matches
    warnings = build(tmp_path / "altered")
    assert len(warnings) == 1 and "sha256" in warnings[0], warnings
    assert digests(tmp_path / "altered") == digests(tmp_path / "first")
    cut = pack_files(tokenizer_module._unpack(good)[:3])  # resealed, but a file short
    entry.write_bytes(cut)
    meta: dict[str, Any] = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(cut).hexdigest()
    sidecar.write_text(json.dumps(meta))
    warnings = build(tmp_path / "cut")
    assert len(warnings) == 1 and "is truncated" in warnings[0], warnings
    assert digests(tmp_path / "cut") == digests(tmp_path / "first")
