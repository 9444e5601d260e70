"""Chat templates: how a conversation becomes the text (and the trained tokens) of a model tuned by
finetune.py. chat.py, export_hf.py (the Jinja copy for `apply_chat_template`) and finetune.py use
them; a fine-tuning checkpoint records the one it was trained with (checkpoint_template).
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import checkpoint
from .dataloader import DataError
from .tokenizer import EOT, get_encoding
from .train_config import ConfigError

EOT_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Template:
    """A chat format: the text around each message. A conversation renders as `first` (with the
    system message and the first user message), then for each answer `reply` + `answer` +
    <|endoftext|>, each later user message as `turn`; a prompt for generation ends with `reply`."""

    name: str
    system: str  # the system message unless the conversation starts with its own
    first: str  # the first user message: {system} and {prompt}
    turn: str  # each later user message: {prompt}
    reply: str  # opens the assistant's turn (the "generation prompt"): no placeholder
    answer: str  # the assistant's message: {answer}; <|endoftext|> follows

    PLACEHOLDERS: ClassVar[dict[str, set[str]]] = {
        "first": {"system", "prompt"}, "turn": {"prompt"}, "reply": set(), "answer": {"answer"}}

    def check(self, where: str) -> None:
        """DataError naming `where` and the field for a placeholder missing or unknown, or a reply
        and answer that BPE would merge where they meet (then the prompt's tokens would differ
        from the full conversation's)."""
        for name, wanted in self.PLACEHOLDERS.items():
            try:
                fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(getattr(self, name))
                          if f is not None]
            except ValueError as e:
                raise DataError(f"{where}: template field {name!r}: {e}") from None
            found = {f for f, _, _ in fields}
            if wanted - found:
                raise DataError(f"{where}: template field {name!r} = {getattr(self, name)!r} lacks the "
                                f"placeholder {{{min(wanted - found)}}}")
            if found - wanted or any(spec or conv for _, spec, conv in fields):
                bad = sorted(found - wanted) or [f for f, s, c in fields if s or c]
                raise DataError(f"{where}: template field {name!r} = {getattr(self, name)!r} has the "
                                f"placeholder {{{bad[0]}...}}; it takes only {sorted(wanted) or 'none'}")
        enc = get_encoding()
        for sample in ("Hello", "1", '"Yes"', "(a)"):
            answer = self.answer.format(answer=sample)
            apart = enc.encode_ordinary(self.reply) + enc.encode_ordinary(answer)
            if enc.encode_ordinary(self.reply + answer) != apart:
                raise DataError(f"{where}: the template's reply {self.reply!r} and answer {self.answer!r} "
                                f"merge into one token where they meet: end the reply or start the answer "
                                f"with a space or a newline")

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as (text, is_answer) pieces; <|endoftext|> follows each answer."""
        system = self.system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        pieces, prompt = [], ""
        for i, message in enumerate(messages):
            if message["role"] == "user":
                prompt += (self.first.format(system=system, prompt=message["content"]) if i == 0
                           else self.turn.format(prompt=message["content"]))
            else:
                pieces += [(prompt + self.reply, False), (self.answer.format(answer=message["content"]), True)]
                prompt = ""
        if add_generation_prompt:
            prompt += self.reply
        if prompt:
            pieces.append((prompt, False))
        return pieces

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(text + (EOT_TEXT if is_answer else "")
                       for text, is_answer in self.segments(messages, add_generation_prompt))

    def jinja(self) -> str:
        """The same format as a Hugging Face chat template: `tokenizer.apply_chat_template(messages,
        add_generation_prompt=True)` gives the tokens of `encode(self.segments(messages, True))`."""
        def text(fmt: str, values: dict[str, str]) -> str:
            out = ""
            for literal, name, _, _ in string.Formatter().parse(fmt):
                # Literals as quoted Jinja strings: whitespace control cannot eat their spaces.
                out += "{{ " + json.dumps(literal, ensure_ascii=False) + " }}" if literal else ""
                out += "{{ " + values[name] + " }}" if name is not None else ""
            return out

        content = "message['content']"
        return (
            "{%- set system = " + json.dumps(self.system, ensure_ascii=False) + " -%}\n"
            "{%- set turns = messages -%}\n"
            "{%- if messages and messages[0]['role'] == 'system' -%}\n"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}\n"
            "{%- endif -%}\n"
            "{%- for message in turns -%}\n"
            "{%- if message['role'] == 'user' -%}\n"
            "{%- if loop.first -%}" + text(self.first, {"system": "system", "prompt": content}) + "{%- else -%}"
            + text(self.turn, {"prompt": content}) + "{%- endif -%}\n"
            "{%- else -%}" + text(self.reply, {}) + text(self.answer, {"answer": content})
            + "{{ " + json.dumps(EOT_TEXT) + " }}{%- endif -%}\n"
            "{%- endfor -%}\n"
            "{%- if add_generation_prompt -%}" + text(self.reply, {}) + "{%- endif -%}\n"
        )


TEMPLATES = {
    # FastChat's vicuna_v1.1 (sep " ", sep2 the end-of-turn token), as the released instruct model.
    "vicuna": Template(
        name="vicuna",
        system="A chat between a curious user and an artificial intelligence assistant. The assistant "
               "gives helpful, detailed, and polite answers to the user's questions.",
        first="{system} USER: {prompt}", turn="USER: {prompt}", reply=" ASSISTANT:", answer=" {answer}"),
    # Stanford Alpaca's prompt (the input, if any, is part of {prompt}).
    "alpaca": Template(
        name="alpaca",
        system="Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.",
        first="{system}\n\n### Instruction:\n{prompt}", turn="\n\n### Instruction:\n{prompt}",
        reply="\n\n### Response:\n", answer="{answer}"),
}


def load_template(spec: str) -> Template:
    """A template by name (TEMPLATES) or from a .json file holding Template's fields, checked."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--template={spec!r}: choose one of {sorted(TEMPLATES)} or a .json file with the "
                          f"fields {[f.name for f in dataclasses.fields(Template)]}")
    try:
        fields = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    names = [f.name for f in dataclasses.fields(Template)]
    if not isinstance(fields, dict):
        raise DataError(f"{path}: expected an object with the fields {names}")
    fields = {"name": path.stem, **fields}
    for name in names:
        if not isinstance(fields.get(name), str):
            raise DataError(f"{path}: field {name!r} is missing or not a string (a template has {names})")
    if set(fields) - set(names):
        raise DataError(f"{path}: unknown field {min(set(fields) - set(names))!r} (a template has {names})")
    template = Template(**fields)
    template.check(str(path))
    return template


def encode(segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation, and which are trained (the answers and their
    <|endoftext|>). Text is encoded as ordinary text: a literal "<|endoftext|>" in the data is
    not the special token."""
    enc = get_encoding()
    ids, trained = [], []
    for text, is_answer in segments:
        piece = enc.encode_ordinary(text) + ([EOT] if is_answer else [])
        ids += piece
        trained += [is_answer] * len(piece)
    return ids, trained


def checkpoint_template(path: str | Path) -> Template | None:
    """The template a fine-tuning checkpoint (run or step directory) was trained with; None for
    other checkpoints (pretraining, imported weights)."""
    if (Path(path) / "model_config.json").is_file():
        return None
    ckpt = checkpoint.resolve(path)
    loader = (checkpoint.read_meta(ckpt).get("loader") or {}) if ckpt else {}
    saved = (loader.get("data") or {}).get("template")
    return Template(**saved) if isinstance(saved, dict) else None
