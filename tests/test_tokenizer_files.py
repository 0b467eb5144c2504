"""The tokenizer files we write from Mistral's SentencePiece models encode, decode and chat exactly as
SentencePiece itself and mistral-common do (no model is built here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.checkpoint import PresetWeights
from exporter.errors import CheckpointError
from exporter.tokenizer import identify, packaged, write_hf_files
from validation.text import encode_chat, load_tokenizer
from validation.tokenizers import texts

PRESETS = {"tiny": ("tokenizer.model.v1", 32000), "mistral-7b-v0.1": ("tokenizer.model.v1", 32000),
           "mistral-7b-v0.3": ("mistral_instruct_tokenizer_240323.model.v3", 32768)}
CONVERSATIONS = [
    (None, ["Hello!"]),
    ("You are terse.", ["What is 2+2?"]),
    (None, ["Hi", "Hello, how can I help?", "Tell me a joke."]),
    ("Be kind.", ["  spaced  ", "ok  ", "Bonjour, ça va ?", "Très bien.", "日本語で"]),
    (None, ["line1\nline2", " leading space", "x"]),
]


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    dest = tmp_path_factory.mktemp("tok") / request.param
    info = PresetWeights(request.param).write_tokenizer(dest)
    name, vocab = PRESETS[request.param]
    assert info is not None and info["mistral_common_file"] == name and info["vocab_size"] == vocab
    assert (dest / "tokenizer.model").read_bytes() == packaged(name).read_bytes()  # kept as is
    return request.param, dest


def test_encodes_and_decodes_like_sentencepiece(preset_tokenizer: tuple[str, Path]) -> None:
    import sentencepiece as spm

    name, folder = preset_tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(packaged(PRESETS[name][0])))
    hf = load_tokenizer(folder)
    items = texts() + texts("known_differences")
    for item in items:
        want = sp.encode(item["text"])
        assert hf.encode(item["text"]) == [sp.bos_id()] + want, item["label"]
        assert hf.decode([sp.bos_id()] + want, skip_special_tokens=True) == sp.decode(want), item["label"]
    print(f"{name}: {len(items)} texts identical to SentencePiece")


def test_chat_template_equals_mistral_common(preset_tokenizer: tuple[str, Path]) -> None:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    name, folder = preset_tokenizer
    mistral = MistralTokenizer.from_file(str(packaged(PRESETS[name][0])))
    hf = load_tokenizer(folder)
    for system, turns in CONVERSATIONS:
        roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
        kinds = {"user": UserMessage, "assistant": AssistantMessage}
        request = ChatCompletionRequest(messages=([SystemMessage(content=system)] if system else [])
                                        + [kinds[r](content=t) for r, t in zip(roles, turns)])
        want = list(mistral.encode_chat_completion(request).tokens)
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": r, "content": t} for r, t in zip(roles, turns)]
        got = hf.apply_chat_template(messages, tokenize=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == want, (system, turns)
        assert encode_chat(folder, turns, system) == (want, f"mistral-common instruct {mistral.instruct_tokenizer.tokenizer.version.value}")


def test_non_mistral_tokenizer_is_its_own_reference_and_chat_falls_back(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    write_hf_files(packaged("tokenizer.model.v1"), folder, "v1")
    (folder / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes() + b"\0")  # not Mistral's now
    assert identify(folder / "tokenizer.model") is None
    ids, how = encode_chat(folder, ["Hi"], None)
    assert how == "the tokenizer's HF chat template" and ids[0] == 1
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="no chat template"):
        encode_chat(folder, ["Hi"], None)


def test_a_file_that_is_not_sentencepiece_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model.v3"
    bad.write_bytes(b"\x08\x96\x01 not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        write_hf_files(bad, tmp_path / "out", "v3")


def test_a_sentencepiece_model_that_is_not_bpe_is_refused(tmp_path: Path) -> None:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog, then sleeps in the sun.\n" * 50)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "uni"), model_type="unigram",
                                   vocab_size=34, minloglevel=2)
    with pytest.raises(CheckpointError, match="not BPE"):
        write_hf_files(tmp_path / "uni.model", tmp_path / "out", None)


def test_a_preset_tokenizer_missing_from_mistral_common_is_a_clear_error(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "mistral_common_data", lambda: tmp_path)
    with pytest.raises(CheckpointError, match="mistral-common has no tokenizer file tokenizer.model.v1"):
        PresetWeights("tiny").write_tokenizer(tmp_path / "out")
