"""Expression text checks: what reaches the model is printable, normalised, bounded and free of model tokens.

Why here and not in the model: a bad expression must become one error row naming the problem, while
the image's other expressions are still annotated; the predictor only ever sees clean text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

#: Unicode categories removed outright: control (Cc), format (Cf: zero-width spaces, bidi overrides,
#: BOM), private use (Co) and unassigned (Cn) code points carry no meaning a referring expression needs.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn"})
_WHITESPACE = re.compile(r"\s+")
#: An expression must hold at least one letter, number or symbol: "..." or "?!" refers to nothing.
_MEANINGFUL = ("L", "N", "S")


@dataclass(frozen=True)
class CleanText:
    """The outcome for one expression: `text` for the model, or `error` explaining why not."""

    text: str | None
    error: str | None


def clean_expression(raw: object, max_chars: int, reserved: Iterable[str] = ()) -> CleanText:
    """Normalise one expression (NFKC, control/format characters dropped, whitespace collapsed) or reject it.

    Rejected: missing or non-string text, lone surrogates, nothing printable left, only punctuation, more
    than `max_chars`
    characters after normalisation, or a `reserved` model token inside (it would corrupt the answer parse).
    """
    if raw is None:
        return CleanText(None, "expression text is missing")
    if not isinstance(raw, str):
        return CleanText(None, f"expression text is a {type(raw).__name__}, not a string")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return CleanText(None, "expression text holds invalid Unicode (a lone surrogate)")
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if ch.isspace() or unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    text = _WHITESPACE.sub(" ", text).strip()
    if not text:
        return CleanText(None, "expression is empty" if not raw.strip() else
                         "expression has no printable characters")
    if not any(unicodedata.category(ch)[0] in _MEANINGFUL for ch in text):
        return CleanText(None, "expression has no letters, digits or symbols")
    if len(text) > max_chars:
        return CleanText(None, f"expression is {len(text)} characters long, over the limit of {max_chars}")
    lowered = text.lower()
    for token in reserved:
        if token and token.lower() in lowered:
            return CleanText(None, f"expression contains the model's reserved token {token!r}")
    return CleanText(text, None)
