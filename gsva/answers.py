"""Reading a freely generated answer: which expression does each generated [SEG]/[REJ] answer?

The phrases of a GSVA answer are the user's own expressions ("Sure, a:[SEG], b:[REJ]."), so each slot is
matched to an expression by the text generated before it: the longest not-yet-answered expression that
occurs in that text as whole words wins. A slot whose text names no expression takes the next unanswered
expression in order (reported as a phrase mismatch); a slot naming only answered expressions is a repeat
(ignored, reported); expressions no slot answers are missing (decision "none", treated as rejected).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


@dataclass
class Matching:
    """``slot_to_expr[i]``: the expression answered by slot i, or None when the slot is ignored;
    ``notes[j]``: remarks about expression j (mismatches, repeats, missing)."""

    slot_to_expr: list[int | None]
    notes: dict[int, list[str]] = field(default_factory=dict)

    def note(self, j: int, text: str) -> None:
        self.notes.setdefault(j, []).append(text)


def match_slots(slot_phrases: list[str], names: list[str]) -> Matching:
    """Assign generated slots (the text before each one) to expressions (see module docstring)."""
    keys = [normalise(n) for n in names]
    result = Matching(slot_to_expr=[])
    used: set[int] = set()
    extra = 0
    for phrase in slot_phrases:
        text = normalise(phrase)
        hits = [j for j, k in enumerate(keys) if _contains(text, k)]
        free = [j for j in hits if j not in used]
        if free:
            j = max(free, key=lambda j: (len(keys[j]), -j))
        elif hits:
            j = max(hits, key=lambda j: (len(keys[j]), -j))
            result.note(j, f"repeated phrase {phrase.strip()!r} ignored")
            result.slot_to_expr.append(None)
            continue
        else:
            rest = [j for j in range(len(names)) if j not in used]
            if not rest:
                extra += 1
                result.slot_to_expr.append(None)
                continue
            j = rest[0]
            result.note(j, f"phrase mismatch: generated {phrase.strip()!r} for {names[j]!r}")
        used.add(j)
        result.slot_to_expr.append(j)
    for j in range(len(names)):
        if extra:
            result.note(j, f"{extra} extra slot(s) after all expressions were answered: ignored")
        if j not in used:
            result.note(j, "missing from the generated answer: neither [SEG] nor [REJ] was generated for it")
    return result
