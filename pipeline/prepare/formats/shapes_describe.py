"""The Shapes-GRES description grammar: what the LLaVA base is pretrained to say about a training image.

Generated from the image's COCO annotations only (each object's colour, shape and box), never from its
referring expressions. Two kinds of sample, one conversation each (question, answer):

- caption (``CAPTION_SHARE`` of the draws): "Describe the shapes in this image." ->
  "There are three shapes: top left red circle, middle right blue square, bottom centre green
  triangle." - every object, left to right (by box centre x, ties by y), its position first.
- where-question: up to K phrases about the image, each one of
  ``the {color} {shape}`` (exactly one such object, or none), ``all {color} shapes``, ``all {shape}s``,
  ``the leftmost {shape}`` / ``the rightmost {shape}`` (two or more of that shape, unique extreme),
  about half of them naming something absent, in "Where are p1, p2, p3 in this image?" (or one of the
  other ``WHERE_QUESTIONS``) ->
  "Sure, p1: top left red circle, p2: none, p3: middle right blue square and bottom left blue circle."
  (ALL the objects the phrase names, left to right, each as in the caption, joined by " and "; "none"
  when it names nothing). The answer's ``{phrase}:`` is where GSVA later reads a ``[SEG]`` prompt, and
  the token it predicts is the first object's row (or "none"): the hidden state there must find the
  phrase's object in the image, not only say that the answer starts. (A first grammar, "p1: a red circle
  at top left", let that state predict "a" for every present phrase; its LLaVA base located nothing.)

Positions are a 5 x 5 grid of the image by box centre: rows ``ROWS`` (top .. bottom), columns
``COLUMNS`` (far left .. far right), written "{row} {column}".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.prepare.formats.shapes_text import COLORS, SHAPES

ROWS = ("top", "upper", "middle", "lower", "bottom")
COLUMNS = ("far left", "left", "centre", "right", "far right")
CAPTION_QUESTION = "Describe the shapes in this image."
#: The where-question's forms: "What are ... in this image?" is also how GSVA's evaluation asks for masks.
WHERE_QUESTIONS = ("Where are {phrases} in this image?", "What are {phrases} in this image?",
                   "Can you find {phrases} in this image?", "Please locate {phrases} in this image.")
ABSENT = "none"
CAPTION_SHARE = 0.3
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class DescribedObject:
    color: str
    shape: str
    cx: float  # box centre, pixels
    cy: float


def from_annotation(category: str, color: str | None, bbox: list[float]) -> DescribedObject:
    """A COCO annotation (category name = shape, extra field ``color``, bbox [x, y, w, h])."""
    if category not in SHAPES or color not in COLORS:
        raise ValueError(f"not a Shapes-GRES object: category {category!r}, color {color!r}")
    x, y, w, h = bbox
    return DescribedObject(color, category, x + w / 2, y + h / 2)


def grid_cell(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """(row, column) indices of a point of the image on the grid (``ROWS`` x ``COLUMNS``)."""
    return min(int(y / height * len(ROWS)), len(ROWS) - 1), min(int(x / width * len(COLUMNS)), len(COLUMNS) - 1)


def position(obj: DescribedObject, width: int, height: int) -> str:
    """"{row} {column}" of the object's centre on the 5 x 5 grid."""
    row, col = grid_cell(obj.cx, obj.cy, width, height)
    return f"{ROWS[row]} {COLUMNS[col]}"


def left_to_right(objects: list[DescribedObject]) -> list[DescribedObject]:
    return sorted(objects, key=lambda o: (o.cx, o.cy))


def described(obj: DescribedObject, width: int, height: int) -> str:
    """"{row} {column} {color} {shape}": the position first (see the module docstring)."""
    return f"{position(obj, width, height)} {obj.color} {obj.shape}"


def caption(objects: list[DescribedObject], width: int, height: int) -> tuple[str, str]:
    parts = [described(o, width, height) for o in left_to_right(objects)]
    count = NUMBERS[len(objects)] if len(objects) < len(NUMBERS) else str(len(objects))
    noun = "shape" if len(objects) == 1 else "shapes"
    return CAPTION_QUESTION, f"There {'is' if len(objects) == 1 else 'are'} {count} {noun}: {', '.join(parts)}."


def phrases(objects: list[DescribedObject]) -> dict[str, list[DescribedObject]]:
    """Every phrase of the grammar about this image -> the objects it names ([] = absent), fixed order."""
    out: dict[str, list[DescribedObject]] = {}
    for c in COLORS:
        for s in SHAPES:
            named = [o for o in objects if o.color == c and o.shape == s]
            if len(named) <= 1:
                out[f"the {c} {s}"] = named
    for c in COLORS:
        out[f"all {c} shapes"] = [o for o in objects if o.color == c]
    for s in SHAPES:
        named = [o for o in objects if o.shape == s]
        out[f"all {s}s"] = named
        if len(named) >= 2:
            ordered = left_to_right(named)
            if ordered[0].cx != ordered[1].cx:
                out[f"the leftmost {s}"] = [ordered[0]]
            if ordered[-1].cx != ordered[-2].cx:
                out[f"the rightmost {s}"] = [ordered[-1]]
    return out


def where_question(objects: list[DescribedObject], width: int, height: int, k: int,
                   rng: random.Random) -> tuple[str, str]:
    """Up to k phrases, each present or absent with probability 1/2 (when the image has both kinds)."""
    options = phrases(objects)
    present = [p for p, named in options.items() if named]
    absent = [p for p, named in options.items() if not named]
    chosen: list[str] = []
    for _ in range(k):
        pool = [p for p in (present if (rng.random() < 0.5 or not absent) else absent) if p not in chosen]
        pool = pool or [p for p in options if p not in chosen]
        chosen.append(rng.choice(pool))
    parts = []
    for p in chosen:
        named = left_to_right(options[p])
        where = " and ".join(described(o, width, height) for o in named) if named else ABSENT
        parts.append(f"{p}: {where}")
    question = WHERE_QUESTIONS[rng.randrange(len(WHERE_QUESTIONS))]
    return question.format(phrases=", ".join(chosen)), f"Sure, {', '.join(parts)}."


def describe(objects: list[DescribedObject], width: int, height: int, k: int,
             rng: random.Random) -> tuple[str, str]:
    """One (question, answer) about an image: a caption or a where-question (see the module docstring)."""
    if not objects:
        raise ValueError("an image without objects has nothing to describe")
    if rng.random() < CAPTION_SHARE:
        return caption(objects, width, height)
    return where_question(objects, width, height, k, rng)
