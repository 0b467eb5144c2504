"""Tokenizer access for artifacts that carry one (local files only; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.errors import ArtifactError, UserError


def load_tokenizer(folder: Path) -> Any:
    """A transformers tokenizer from the artifact's tokenizer/ folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the tokenizer in {folder}: {exc}") from None


def mistral_tokenizer(folder: Path) -> tuple[Any, str] | None:
    """mistral-common's MistralTokenizer and the name of the file it ships that is byte-identical to the
    folder's tokenizer.model; None when there is none."""
    from exporter.tokenizer import SPM_FILE, identify, packaged

    known = identify(folder / SPM_FILE) if (folder / SPM_FILE).is_file() else None
    if known is None:
        return None
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(packaged(known))), known


def encode_chat(folder: Path, turns: list[str], system: str | None, hf: Any = None) -> tuple[list[int], str]:
    """A conversation (user, assistant, user, ... ending with the user) as prompt ids, and how it was
    encoded: Mistral's instruct format through mistral-common where the tokenizer is one of Mistral's,
    else the tokenizer's own HF chat template (`hf`: the folder's tokenizer, if already loaded)."""
    if len(turns) % 2 == 0:
        raise UserError(f"--chat turns alternate user, assistant, user, ... and end with the user; got {len(turns)}")
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    found = mistral_tokenizer(folder)
    if found is not None:
        mistral = found[0]
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"user": UserMessage, "assistant": AssistantMessage}
        messages = ([SystemMessage(content=system)] if system else []) + \
            [kinds[r](content=t) for r, t in zip(roles, turns)]
        ids = mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        return list(ids), f"mistral-common instruct {mistral.instruct_tokenizer.tokenizer.version.value}"
    hf = hf if hf is not None else load_tokenizer(folder)
    if not getattr(hf, "chat_template", None):
        raise UserError(f"the tokenizer in {folder} is not one of Mistral's and has no chat template; use --prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": r, "content": t} for r, t in zip(roles, turns)]
    ids = hf.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids), "the tokenizer's HF chat template"


class TextStream:
    """Decodes generated ids as they arrive and hands out only the new text; text that ends inside a
    character (byte-fallback pieces of one emoji, say) waits for the rest."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
