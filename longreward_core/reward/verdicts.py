"""Verdict formats: how a judge answer ends, and the parsers that read it.

Every judge prompt asks for an analysis first, then a verdict in a fixed form: a rating `[[N]]`,
a label `[[Fully supported]]`, or a marked list (`[[statements]]` ... `[[end]]`). A format also
describes its verdict for judges that decode under a constraint (the embedded judge).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class VerdictParseError(ValueError):
    """The judge's answer holds no verdict in the required format."""


@dataclass(frozen=True)
class VerdictFormat(Generic[T]):
    """How a judge answer ends, and how to read it.

    `parse` reads the verdict from the answer. `prefix`/`choices`/`suffix` describe the verdict
    for judges that decode under a constraint (the embedded judge): the answer ends with
    `prefix + one of choices + suffix`, or with `prefix` followed by free list items (or the
    `none` marker) when `choices` is None.
    """

    parse: Callable[[str], T]
    prefix: str
    choices: tuple[str, ...] | None = None
    suffix: str = ""
    none: str | None = None  # list answers: the marker for "nothing to list"

    def constraint(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "choices": list(self.choices) if self.choices else None,
            "suffix": self.suffix,
            "none": self.none,
        }


# The verdict line every rating prompt asks for: "Rating: [[N]]" (the label's case and Markdown
# emphasis around it vary between judges). A bare [[N]] is not a verdict: analyses quote ratings.
_RATING = re.compile(r"rating[*_\s]*[:\uff1a][*_\s]*\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)


def parse_rating(text: str) -> float:
    """N of the last `Rating: [[N]]` line of the answer, N in 0..10; a `[[N]]` anywhere else in the
    answer (quoted in the analysis, or after the verdict) is not read."""
    matches = _RATING.findall(text)
    if not matches:
        raise VerdictParseError("no 'Rating: [[N]]' verdict in the answer")
    value = float(matches[-1])
    if not 0 <= value <= 10:
        raise VerdictParseError(f"rating {value} outside 0-10")
    return value


RATING = VerdictFormat(parse=parse_rating, prefix="Rating: [[", choices=tuple(str(i) for i in range(11)), suffix="]]")


_BULLET = re.compile(r"^\s*(?:(?:[-*\u2022]|\d+[.)、])\s*)+")


def parse_marked_list(text: str, *, open_marker: str, none_marker: str, close_marker: str = "[[end]]") -> list[str]:
    """Bullet items between the last `open_marker` and `close_marker`, or [] after `none_marker`.

    A missing close marker is tolerated (answers cut at max_tokens keep their complete items), but
    then an answer that does not end with a newline stopped mid-item, and that last item is not
    read; a missing open marker is not tolerated. A header line ending with a colon
    ("Statements:") is not an item.
    """
    lower = text.lower()
    open_at = lower.rfind(open_marker.lower())
    none_at = lower.rfind(none_marker.lower())
    if open_at < 0 and none_at < 0:
        raise VerdictParseError(f"neither '{open_marker}' nor '{none_marker}' in the answer")
    if none_at > open_at:
        return []
    body = text[open_at + len(open_marker) :]
    close_at = body.lower().find(close_marker.lower())
    lines = body[:close_at].splitlines() if close_at >= 0 else body.splitlines()
    cut_off = close_at < 0 and not text.endswith("\n") and bool(lines)
    if cut_off:
        lines = lines[:-1]
    items = []
    for line in lines:
        item = _BULLET.sub("", line).strip()
        if item and not item.endswith((":", "\uff1a")):  # \uff1a: the full-width colon of Chinese headers
            items.append(item)
    if not items:
        stopped = " (the answer stops in the middle of an item)" if cut_off else ""
        raise VerdictParseError(f"'{open_marker}' is followed by no item{stopped}")
    return items
