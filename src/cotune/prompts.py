"""The prompt template: one file gives the training text, the inference prompt and the GGUF's chat template,
so the model is always asked in exactly the form it learned."""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError

PLACEHOLDERS = ("{question}", "{reasoning}", "{response}")


@dataclass(frozen=True)
class PromptTemplate:
    """A template split at its placeholders: head {question} middle {reasoning} close {response} tail."""

    source: str
    head: str
    middle: str
    close: str
    tail: str

    @property
    def reasoning_open(self) -> str:
        """The tag that opens the reasoning section: the last line of the inference prompt."""
        return self.middle.strip().splitlines()[-1].strip()

    @property
    def reasoning_close(self) -> str:
        """The tag that closes the reasoning section; an answer without it never finished thinking."""
        return self.close.strip()

    def prompt(self, question: str) -> str:
        """What the model is asked: everything up to where the reasoning starts."""
        return self.head + question + self.middle

    def training_text(self, question: str, reasoning: str, response: str, eos_token: str) -> str:
        """One training text, ending with the tokenizer's EOS exactly once."""
        body = self.prompt(question) + reasoning + self.close + response + self.tail
        while body.endswith(eos_token):
            body = body[: -len(eos_token)]
        return body + eos_token

    def chat_template(self) -> str:
        """A Jinja chat template that renders the last user message as exactly `prompt(question)`.

        Literal text is wrapped in raw blocks, so braces in the template can't be read as Jinja.
        """
        def raw(text: str) -> str:
            return "{% raw %}" + text + "{% endraw %}" if text else ""

        return ("{%- set ns = namespace(q='') -%}"
                "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
                "{%- set ns.q = message['content'] -%}{%- endif -%}{%- endfor -%}"
                + raw(self.head) + "{{ ns.q }}" + raw(self.middle))


def parse_template(text: str, source: str) -> PromptTemplate:
    positions = [text.find(p) for p in PLACEHOLDERS]
    missing = [p for p, pos in zip(PLACEHOLDERS, positions) if pos < 0]
    if missing:
        raise UserError(f"template {source}: missing placeholder {', '.join(missing)}; a template holds "
                        f"{{question}}, {{reasoning}} and {{response}} once each, in that order")
    if any(text.count(p) != 1 for p in PLACEHOLDERS) or positions != sorted(positions):
        raise UserError(f"template {source}: {{question}}, {{reasoning}} and {{response}} must appear once each, "
                        "in that order")
    q, r, a = positions
    head, middle = text[:q], text[q + len("{question}"):r]
    close, tail = text[r + len("{reasoning}"):a], text[a + len("{response}"):]
    if not middle.strip():
        raise UserError(f"template {source}: put an opening tag such as <think> between {{question}} and "
                        "{reasoning}, so the answer's reasoning section can be recognised")
    if not close.strip():
        raise UserError(f"template {source}: put a closing tag such as </think> between {{reasoning}} and "
                        "{response}, so verify can tell that the reasoning section was closed")
    # The prompt (head, question, middle) also becomes the GGUF's Jinja chat template, inside raw blocks, and the
    # Ollama Modelfile's TEMPLATE, inside triple quotes: text that would end either early is refused here, at load,
    # not when export or push meets it.
    if JINJA_RAW_END.search(head + middle):
        raise UserError(f"template {source}: holds {JINJA_RAW_END.search(head + middle).group()!r} before "
                        "{reasoning}, which would end the chat template's literal text early; remove it")
    if '"""' in head + middle:
        raise UserError(f'template {source}: holds """ before {{reasoning}}, which would end the Ollama Modelfile\'s '
                        'TEMPLATE """...""" early; remove it')
    return PromptTemplate(source, head, middle, close, tail)


JINJA_RAW_END = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}")


def template_text(name_or_path: str) -> tuple[str, str]:
    """(text, where it came from) of a built-in template by name (fortune_cot) or a UTF-8 file."""
    builtin = resources.files("cotune") / "templates" / f"{name_or_path}.txt"
    if "/" not in name_or_path and builtin.is_file():
        return builtin.read_text(encoding="utf-8"), f"built-in {name_or_path}"
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"TEMPLATE={name_or_path!r}: no such built-in template or file; use fortune_cot or a path "
                        "to a text file")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"TEMPLATE={name_or_path!r}: can't read it as UTF-8 text ({err})") from None


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name (fortune_cot) or a UTF-8 file."""
    return parse_template(*template_text(name_or_path))
