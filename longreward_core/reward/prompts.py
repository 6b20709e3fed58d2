"""Judge prompt templates: loading, language choice, and filling them with untrusted text.

Templates are `<name>.<lang>.txt` files with `{{placeholder}}` slots, beside the code that uses
them: the four dimensions' in `reward/dimensions/`, the evaluation judges' in `evaluation/prompts/`. Everything put into
a slot (document, question, response, statements) is untrusted: verdict markers in it are broken
up (`[[` -> `[ [`) and our input tags are defused, so text written by a candidate can never be
read back as the judge's verdict, however the judge echoes it.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from importlib.abc import Traversable
from typing import Any

LANGUAGES = ("en", "zh")
DIMENSION_PROMPTS = resources.files("longreward_core.reward.dimensions")

_SLOT = re.compile(r"\{\{(\w+)\}\}")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_INPUT_TAG = re.compile(
    r"<(/?)(question|response|document_excerpts|statement|document_chunk|key_points|reference_answer|graded_examples)>",
    re.I,
)


def detect_language(text: str) -> str:
    """'en' when Latin letters outnumber CJK characters four to one, else 'zh'."""
    latin = len(_LATIN.findall(text))
    cjk = len(_CJK.findall(text))
    return "en" if latin >= 4 * cjk else "zh"


def neutralise(text: str) -> str:
    """Make untrusted text unable to carry a verdict marker or close an input tag."""
    text = text.replace("[[", "[ [").replace("]]", "] ]")
    return _INPUT_TAG.sub(lambda m: f"<{m.group(1)} {m.group(2)}>", text)


@functools.cache
def load_template(name: str, language: str, folder: Traversable = DIMENSION_PROMPTS) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"unknown prompt language '{language}' (expected one of {LANGUAGES})")
    return (folder / f"{name}.{language}.txt").read_text(encoding="utf-8")


def render(name: str, language: str, folder: Traversable = DIMENSION_PROMPTS, **slots: str) -> list[dict[str, str]]:
    """The judge messages for template `name` in `folder`, with every slot neutralised and filled."""
    template = load_template(name, language, folder)
    wanted = set(_SLOT.findall(template))
    if wanted != set(slots):
        raise KeyError(f"template {name}.{language} takes slots {sorted(wanted)}, got {sorted(slots)}")
    # One pass, so a slot value that happens to contain '{{x}}' is never substituted again.
    text = _SLOT.sub(lambda m: neutralise(slots[m.group(1)]), template)
    first_slot = _SLOT.search(template)
    if first_slot is not None:
        _shared_prefixes.add(template[: first_slot.start()])
    return [{"role": "user", "content": text}]


# The text before the first slot of every template rendered: instructions and examples that every
# prompt of the template shares word for word.
_shared_prefixes: set[str] = set()


def with_cache_breakpoint(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with the last one's shared instructions (a rendered template's text before its
    first slot) as a text part marked with an Anthropic `cache_control` breakpoint; unchanged when
    no template prefix matches."""
    last = messages[-1]
    content = last.get("content")
    if not isinstance(content, str):
        return messages
    prefix = max((p for p in _shared_prefixes if content.startswith(p)), key=len, default="")
    if not prefix:
        return messages
    parts = [
        {"type": "text", "text": prefix, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": content[len(prefix):]},
    ]
    return [*messages[:-1], {**last, "content": parts}]
