"""What a caller may hand the predictor: expression text checks and the request defaults shared by every caller.

What reaches the model is printable, normalised, bounded and free of model tokens. Why before the predictor
and not in it: a bad expression must become one error (an error row in annotate, one line in
``python -m gsva predict``) naming the problem, while the image's other expressions are still answered. Both
callers check through here and ask with the same defaults, so they send the model identical prompts.
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
#: Longest accepted expression, after normalisation: gRefCOCO sentences are far shorter, and a 10,000-character
#: "expression" is a prompt no GSVA model was trained on.
MAX_EXPRESSION_CHARS = 256
#: Expressions of one image per conversation (K) when the caller does not choose (annotate, predict): None,
#: every expression of the image in one conversation, as the GSVA protocol; a number caps it (long lists).
EXPRESSIONS_PER_PROMPT: int | None = None


@dataclass(frozen=True)
class CleanText:
    """The outcome for one expression: `text` for the model, or `error` explaining why not."""

    text: str | None
    error: str | None


def reserved_tokens() -> tuple[str, ...]:
    """Token strings user text must not contain (the predictor would strip them; callers report them instead)."""
    from gsva.config import TokensConfig
    from gsva.tokens import BOS, EOS, UNK

    t = TokensConfig()
    return (t.seg, t.rej, t.im_start, t.im_end, t.image, UNK, BOS, EOS)


def clean_expression(raw: object, max_chars: int = MAX_EXPRESSION_CHARS, reserved: Iterable[str] = ()) -> CleanText:
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
