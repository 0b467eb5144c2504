"""The default tiny preset speaks text with Mistral's real v1 tokenizer, end to end: the tokenizer-parity
gate in validation, `generate --prompt/--chat/--json`, and the real clients (onnxruntime-genai,
OpenVINO GenAI) producing our text and mistral-common's chat ids from the artifact unchanged.

One ONNX Runtime and one OpenVINO build of the tiny preset (window 16) are shared by the module; the
prompts are longer than the window. Planted defects (a tokenizer that differs in one place) must fail
the gate with the first differing text."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from exporter.manifest import read_manifest, write_manifest
from tests.conftest import cli_build, cli_run as run

V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"  # Mistral-7B-v0.1's tokenizer.model
# 42 tokens: past the window of 16 more than twice.
TEXT = ("The rolling buffer keeps the last sixteen keys; older ones are overwritten. "
        "Le tampon circulaire garde les seize dernières clés, et les plus anciennes sont écrasées.")
CHAT = [("system", "Answer briefly."), ("user", "What is a rolling buffer?"), ("assistant", "A ring of slots."),
        ("user", "Und auf Deutsch, bitte?")]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def ort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "tiny-ort"
    assert cli_build("onnxruntime", out).exit_code == 0  # the README's first command, default preset
    return out


@pytest.fixture(scope="module")
def ov(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "tiny-ov"
    assert cli_build("openvino", out).exit_code == 0
    return out


def mistral_chat_ids() -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[r](content=t) for r, t in CHAT])
    return list(MistralTokenizer.v1().encode_chat_completion(request).tokens)


def ours(artifact: Path, *prompt: str, new: int = 12) -> dict[str, Any]:
    result = run("generate", str(artifact), *prompt, "--max-new-tokens", str(new), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tiny_preset_carries_the_real_v1_tokenizer(ort: Path) -> None:
    manifest = read_manifest(ort)
    assert manifest["model"]["config"]["vocab_size"] == 32000
    info = manifest["model"]["tokenizer_info"]
    assert info["mistral_common_file"] == "tokenizer.model.v1" and info["instruct_version"] == "v1"
    assert hashlib.sha256((ort / "tokenizer" / "tokenizer.model").read_bytes()).hexdigest() == V1_SHA256
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (ort / "tokenizer" / name).is_file() and (ort / name).is_file()  # og reads the root copies
    config = json.loads((ort / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["chat_template"] and config["add_bos_token"] is True


@pytest.mark.parametrize("which", ["ort", "ov"])
def test_report_has_a_passing_tokenizer_parity_section(which: str, request: pytest.FixtureRequest) -> None:
    artifact = request.getfixturevalue(which)
    section = json.loads((artifact / "report.json").read_text())["parity"]["tokenizer"]
    client = {"ort": "onnxruntime-genai", "ov": "openvino-tokenizers"}[which]
    rows = {r["tokenizer"]: r for r in section["tokenizers"]}
    print(json.dumps(section, ensure_ascii=False, indent=1)[:2000])
    assert section["status"] == "passed" and section["reference"].startswith("mistral-common tokenizer.model.v1")
    assert set(rows) == {"hf", client} and section["texts"] >= 25
    assert all(r["status"] == "passed" and r["texts"] == section["texts"] for r in rows.values())
    assert "### Tokenizer: **passed**" in (artifact / "report.md").read_text()


def test_generate_prompt_streams_text_and_json_has_text_and_ids(ort: Path) -> None:
    from validation.text import load_tokenizer

    tok = load_tokenizer(ort / "tokenizer")
    data = ours(ort, "--prompt", TEXT)
    assert data["prompt_tokens"] == len(tok.encode(TEXT)) > 2 * 16
    assert len(data["token_ids"]) == 12 and data["text"] == tok.decode(data["token_ids"], skip_special_tokens=True)
    assert data["text"].strip()
    same = ours(ort, "--prompt-ids", ",".join(map(str, tok.encode(TEXT))))
    assert same["token_ids"] == data["token_ids"]
    human = run("generate", str(ort), "--prompt", TEXT, "--max-new-tokens", "12")
    assert human.exit_code == 0 and human.output.startswith(data["text"]), human.output


def test_generate_chat_encodes_like_mistral_common(ort: Path) -> None:
    turns = [a for r, t in CHAT if r != "system" for a in ("--chat", t)]
    data = ours(ort, "--system", CHAT[0][1], *turns)
    assert data["prompt_from"] == "mistral-common instruct v1"
    reference = mistral_chat_ids()
    assert data["token_ids"] == ours(ort, "--prompt-ids", ",".join(map(str, reference)))["token_ids"]
    assert data["prompt_tokens"] == len(reference)
    result = run("generate", str(ort), "--chat", "a", "--chat", "b")
    assert result.exit_code == 2 and "end with the user" in result.output


def test_onnxruntime_genai_text_and_chat_equal_ours(ort: Path) -> None:
    _need("onnxruntime_genai")
    import onnxruntime_genai as og

    model = og.Model(str(ort))
    tok = og.Tokenizer(model)
    prompt = [tok.bos_token_id] + [int(i) for i in tok.encode(TEXT)]  # og's encode adds no BOS
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 12)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    mine = ours(ort, "--prompt", TEXT)
    print(f"prompt {len(prompt)} tokens: genai {tok.decode(tokens)!r}, ours {mine['text']!r}")
    assert tokens == mine["token_ids"] and tok.decode(tokens) == mine["text"]
    rendered = tok.apply_chat_template(json.dumps([{"role": r, "content": t} for r, t in CHAT]),
                                       add_generation_prompt=True)
    assert [int(i) for i in tok.encode(rendered)] == mistral_chat_ids()


def test_openvino_genai_text_and_chat_equal_ours(ov: Path) -> None:
    _need("openvino_genai")
    import openvino_genai as genai

    pipe = genai.LLMPipeline(str(ov), "CPU", ATTENTION_BACKEND="SDPA", INFERENCE_PRECISION_HINT="f32",
                             KV_CACHE_PRECISION="f32")
    config = genai.GenerationConfig(max_new_tokens=12, do_sample=False, ignore_eos=True)
    config.apply_chat_template = False  # a plain prompt, as `generate --prompt` takes it
    theirs = pipe.generate(TEXT, config)
    mine = ours(ov, "--prompt", TEXT)
    print(f"genai {theirs!r}, ours {mine['text']!r}")
    assert str(theirs) == mine["text"]
    tok = genai.Tokenizer(str(ov))
    rendered = tok.apply_chat_template([{"role": r, "content": t} for r, t in CHAT], add_generation_prompt=True)
    assert tok.encode(rendered, add_special_tokens=False).input_ids.data[0].tolist() == mistral_chat_ids()


def _swap_ids(tokenizer_json: Path, a: str, b: str) -> None:
    """A planted defect: two vocabulary entries trade ids in one tokenizer.json."""
    spec = json.loads(tokenizer_json.read_text())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False))


def _planted(src: Path, dst: Path, plant: Any) -> Path:
    shutil.copytree(src, dst)
    plant(dst)
    write_manifest(dst, read_manifest(dst, verify=False))  # rehashed, so only the tokenizer check can catch it
    return dst


@pytest.mark.parametrize("where,tokenizer", [("tokenizer/tokenizer.json", "hf"), ("tokenizer.json", "onnxruntime-genai")])
def test_planted_tokenizer_defect_fails_the_gate(ort: Path, tmp_path: Path, where: str, tokenizer: str) -> None:
    if tokenizer == "onnxruntime-genai":
        _need("onnxruntime_genai")
    # "▁de" is in the French and Spanish texts only, so the mismatch is found deep in the set.
    art = _planted(ort, tmp_path / "art", lambda d: _swap_ids(d / where, "▁de", "▁und"))
    result = run("validate", str(art), "--json")
    assert result.exit_code == 3, result.output
    section = json.loads((art / "report.json").read_text())["parity"]["tokenizer"]
    row = next(r for r in section["tokenizers"] if r["tokenizer"] == tokenizer)
    assert section["status"] == "failed" and row["status"] == "failed"
    assert row["first_mismatch"]["label"] in ("french", "spanish", "portuguese", "german"), row
    failures = json.loads((art / "report.json").read_text())["parity"]["failures"]
    assert any(f["section"] == "tokenizer" and f["metric"].startswith(tokenizer) for f in failures)


def test_planted_openvino_tokenizer_defect_fails_the_gate(ov: Path, tmp_path: Path) -> None:
    _need("openvino_tokenizers")
    import openvino as ov_
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    def plant(d: Path) -> None:
        bad = tmp_path / "bad-hf"
        shutil.copytree(d / "tokenizer", bad)
        _swap_ids(bad / "tokenizer.json", "▁de", "▁und")
        encoder, decoder = convert_tokenizer(AutoTokenizer.from_pretrained(str(bad)), with_detokenizer=True)
        ov_.save_model(encoder, d / "openvino_tokenizer.xml")
        ov_.save_model(decoder, d / "openvino_detokenizer.xml")

    art = _planted(ov, tmp_path / "art", plant)
    assert run("validate", str(art)).exit_code == 3
    rows = json.loads((art / "report.json").read_text())["parity"]["tokenizer"]["tokenizers"]
    assert [r["status"] for r in rows if r["tokenizer"] == "openvino-tokenizers"] == ["failed"]
    assert [r["status"] for r in rows if r["tokenizer"] == "hf"] == ["passed"]
