"""Tokenizer files an artifact carries.

Mistral's own SentencePiece files (from the installed mistral-common package, or a Mistral download
folder) are converted into the files Hugging Face, onnxruntime-genai and openvino-tokenizers read:
tokenizer.json, tokenizer_config.json (with a chat template) and special_tokens_map.json, with
tokenizer.model kept byte for byte. Nothing is downloaded.

The conversion follows the SentencePiece model's own normalizer spec (transformers' SpmConverter in its
legacy form): measured on this project, that form encodes exactly as SentencePiece does, where the
non-legacy Metaspace form (transformers 5's LlamaTokenizer) drops the dummy prefix before a leading space.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

from exporter.errors import CheckpointError

# The preset -> the mistral-common data file it carries.
PRESET_TOKENIZERS = {"tiny": "tokenizer.model.v1", "mistral-7b-v0.1": "tokenizer.model.v1",
                     "mistral-7b-v0.3": "mistral_instruct_tokenizer_240323.model.v3"}
SPM_FILE = "tokenizer.model"
# SentencePiece piece types (sentencepiece_model.proto): 2 unknown, 3 control, 4 user-defined.
_UNKNOWN, _CONTROL, _USER = 2, 3, 4


def mistral_common_data() -> Path:
    try:
        import mistral_common
    except ImportError:
        raise CheckpointError("the mistral-common package is not installed; pip install mistral-common") from None
    return Path(mistral_common.__file__).parent / "data"


def packaged(name: str) -> Path:
    path = mistral_common_data() / name
    if not path.is_file():
        raise CheckpointError(f"mistral-common has no tokenizer file {name}; pip install -U mistral-common")
    return path


@cache
def _packaged_hashes() -> dict[str, str]:
    from exporter.checkpoint import sha256_file  # deferred: checkpoint imports this module

    data = mistral_common_data()
    return {sha256_file(p): p.name for p in sorted(data.iterdir()) if ".model" in p.name}


def identify(spm: Path) -> str | None:
    """The mistral-common data file byte-identical to this SentencePiece file, if there is one."""
    from exporter.checkpoint import sha256_file

    try:
        return _packaged_hashes().get(sha256_file(spm))
    except CheckpointError:
        return None


def version_of(name: str) -> str | None:
    """The instruct version a Mistral file name carries (`tokenizer.model.v3` -> v3)."""
    suffix = name.rsplit(".", 1)[-1]
    return suffix.split("m")[0] if suffix.startswith("v") else None


def write_hf_files(spm: Path, dest: Path, version: str | None) -> dict[str, Any]:
    """tokenizer.model (as is), tokenizer.json, tokenizer_config.json and special_tokens_map.json in dest."""
    try:
        from tokenizers import AddedToken, Tokenizer, processors
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter
    except ImportError as exc:
        raise CheckpointError(f"converting {spm.name} needs {exc.name}; pip install transformers sentencepiece "
                              "protobuf") from None
    try:
        proto = SentencePieceExtractor(str(spm)).proto
    except Exception as exc:  # protobuf's DecodeError and friends: not a SentencePiece model
        raise CheckpointError(f"{spm} is not a SentencePiece model ({type(exc).__name__}); give the "
                              "checkpoint's own tokenizer file") from None
    if proto.trainer_spec.model_type != 2:
        raise CheckpointError(f"{spm} is a SentencePiece model of type {proto.trainer_spec.model_type}, "
                              "not BPE; Mistral tokenizers are BPE")
    pieces = list(proto.pieces)
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(pieces)}, legacy=True)
    spec = json.loads(tok.to_str())
    # User-defined pieces become added tokens instead of a Split pre-tokenizer with ignore_merges, which
    # onnxruntime-genai's tokenizer misreads (it then emits single characters); SentencePiece emits both whole.
    spec["model"]["ignore_merges"] = False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":
        spec["pre_tokenizer"] = next(p for p in pre["pretokenizers"] if p["type"] == "Metaspace")
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == _USER])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (_UNKNOWN, _CONTROL)])
    bos, eos, unk = (pieces[i].piece for i in (proto.trainer_spec.bos_id, proto.trainer_spec.eos_id,
                                                proto.trainer_spec.unk_id))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, proto.trainer_spec.bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                 clean_up_tokenization_spaces=False)
    template = chat_template(version)
    dest.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(dest))
    # The generic class loads as written in transformers 4 and 5; "LlamaTokenizer" would rebuild the
    # pre-tokenizer in transformers 5 and encode leading spaces differently.
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    if template is not None:  # in tokenizer_config.json, where every reader looks (onnxruntime-genai too)
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    shutil.copyfile(spm, dest / SPM_FILE)
    return {"kind": "sentencepiece", "vocab_size": len(pieces), "instruct_version": version,
            "mistral_common_file": identify(spm), "chat_template": template is not None}


# Mistral's instruct formats as mistral-common encodes them (InstructTokenizerV1 / V2-V3), written as
# Hugging Face chat templates. Segments between special tokens are encoded on their own, with the
# dummy prefix, exactly as mistral-common encodes each message on its own.
_SYSTEM = ("{%- set ns = namespace(system='', last=-1) -%}"
           "{%- for m in messages -%}"
           "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] -%}"
           "{%- elif m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
           "{%- endfor -%}")
# v1: [INST] and [/INST] are text; the system prompt joins the first user message.
_V1 = (_SYSTEM + "{{- bos_token -}}{%- set state = namespace(first=true) -%}"
       "{%- for m in messages -%}"
       "{%- if m['role'] == 'user' -%}"
       "{{- '[INST] ' + (ns.system + '\n\n' if state.first and ns.system else '') + m['content'] + ' [/INST]' -}}"
       "{%- set state.first = false -%}"
       "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}{%- endif -%}"
       "{%- endfor -%}")
# v2/v3: [INST] and [/INST] are control tokens; the system prompt joins the last user message and an
# assistant message loses its trailing spaces.
_V3 = (_SYSTEM + "{{- bos_token -}}"
       "{%- for m in messages -%}"
       "{%- if m['role'] == 'user' -%}"
       "{{- '[INST]' + (ns.system + '\n\n' if loop.index0 == ns.last and ns.system else '') + m['content'] + '[/INST]' -}}"
       "{%- elif m['role'] == 'assistant' -%}{{- m['content'].rstrip(' ') + eos_token -}}{%- endif -%}"
       "{%- endfor -%}")
CHAT_TEMPLATES = {"v1": _V1, "v2": _V3, "v3": _V3}


def chat_template(version: str | None) -> str | None:
    return CHAT_TEMPLATES.get(version or "")
