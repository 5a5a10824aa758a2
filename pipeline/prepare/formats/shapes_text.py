"""Shapes-GRES expressions: every sentence a scene realises, by kind, and the 4 independent draws per image.

Exactly the table of `shapes-gres.md`. One reading the spec leaves open: `the leftmost {shape}` /
`the rightmost {shape}` are realisable only when the extreme centre is unique (two same-shape objects
stacked at the same cx would make the sentence ambiguous); with integer centres that is rare.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import permutations

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

SINGLE, MULTI, NO_TARGET = "single", "multi", "no-target"
KINDS: tuple[str, ...] = (SINGLE, MULTI, NO_TARGET)
KIND_PROBS: tuple[float, ...] = (0.45, 0.35, 0.20)
EXPRESSIONS_PER_IMAGE = 4
#: Kind draws per expression before the image keeps fewer expressions.
MAX_KIND_DRAWS = 100


@dataclass(frozen=True)
class Sentence:
    text: str
    kind: str
    targets: tuple[int, ...]  # indices into the scene's objects, in mention order; () for no-target


def realisable(objects: list[tuple[str, str, int]]) -> dict[str, list[Sentence]]:
    """All sentences of each kind for objects given as (colour, shape, cx), in a fixed order."""
    pairs = Counter((c, s) for c, s, _ in objects)
    colors = Counter(c for c, _, _ in objects)
    shapes = Counter(s for _, s, _ in objects)
    out: dict[str, list[Sentence]] = {k: [] for k in KINDS}
    unique = [(c, s) for c in COLORS for s in SHAPES if pairs[(c, s)] == 1]
    index_of = {(c, s): i for i, (c, s, _) in enumerate(objects) if pairs[(c, s)] == 1}

    for c, s in unique:
        out[SINGLE].append(Sentence(f"the {c} {s}", SINGLE, (index_of[(c, s)],)))
    for s in SHAPES:
        if shapes[s] < 2:
            continue
        members = [(cx, i) for i, (_, shape, cx) in enumerate(objects) if shape == s]
        xs = [cx for cx, _ in members]
        for word, extreme in (("leftmost", min(xs)), ("rightmost", max(xs))):
            at = [i for cx, i in members if cx == extreme]
            if len(at) == 1:
                out[SINGLE].append(Sentence(f"the {word} {s}", SINGLE, (at[0],)))

    for c in COLORS:
        if colors[c] >= 2:
            out[MULTI].append(Sentence(f"all {c} shapes", MULTI,
                                       tuple(i for i, (oc, _, _) in enumerate(objects) if oc == c)))
    for s in SHAPES:
        if shapes[s] >= 2:
            out[MULTI].append(Sentence(f"all {s}s", MULTI,
                                       tuple(i for i, (_, os_, _) in enumerate(objects) if os_ == s)))
    for (c1, s1), (c2, s2) in permutations(unique, 2):
        out[MULTI].append(Sentence(f"the {c1} {s1} and the {c2} {s2}", MULTI,
                                   (index_of[(c1, s1)], index_of[(c2, s2)])))

    for c in COLORS:
        for s in SHAPES:
            if pairs[(c, s)] == 0 and (colors[c] > 0 or shapes[s] > 0):
                out[NO_TARGET].append(Sentence(f"the {c} {s}", NO_TARGET, ()))
    for c in COLORS:
        if colors[c] == 0:
            out[NO_TARGET].append(Sentence(f"all {c} shapes", NO_TARGET, ()))
    return out


TEMPLATES: tuple[str, ...] = ("the {color} {shape}", "the leftmost/rightmost {shape}", "all {color} shapes",
                              "all {shape}s", "the {color1} {shape1} and the {color2} {shape2}")


def template_of(text: str) -> str:
    """The spec-table template a Shapes-GRES sentence was made from (for per-template error analysis)."""
    words = text.split()
    if " and " in text:
        return TEMPLATES[4]
    if words[:1] == ["all"]:
        return TEMPLATES[2] if words[-1] == "shapes" else TEMPLATES[3]
    if len(words) > 1 and words[1] in ("leftmost", "rightmost"):
        return TEMPLATES[1]
    if len(words) == 3 and words[1] in COLORS and words[2] in SHAPES:
        return TEMPLATES[0]
    raise ValueError(f"not a Shapes-GRES sentence: {text!r}")


def draw_expressions(options: dict[str, list[Sentence]], rng: np.random.Generator,
                     count: int = EXPRESSIONS_PER_IMAGE) -> list[Sentence]:
    """`count` independent draws: a kind by KIND_PROBS, then a sentence of it not yet drawn (uniform).

    A kind with nothing left is drawn again; after MAX_KIND_DRAWS fruitless draws the image keeps fewer.
    """
    chosen: list[Sentence] = []
    used: set[str] = set()
    for _ in range(count):
        for _ in range(MAX_KIND_DRAWS):
            kind = KINDS[int(rng.choice(len(KINDS), p=KIND_PROBS))]
            left = [s for s in options[kind] if s.text not in used]
            if left:
                pick = left[int(rng.integers(len(left)))]
                chosen.append(pick)
                used.add(pick.text)
                break
        else:
            break
    return chosen
