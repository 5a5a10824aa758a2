"""One image, a few expressions: ``python -m gsva predict``'s work, with no Ray and no task shards.

The expressions are checked by ``gsva.inputs`` and asked through ``GSVAPredictor.predict`` with the same
defaults as the annotate job (K = ``EXPRESSIONS_PER_PROMPT``), so the masks equal annotate's for the same image
and checkpoint. Writes ``overlay.png`` (gsva.overlay) and ``predictions.json`` (masks as COCO compressed RLE,
the representation annotate stores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from gsva.config import GENERATE
from gsva.images import decode_image, read_image_bytes
from gsva.inputs import EXPRESSIONS_PER_PROMPT, MAX_EXPRESSION_CHARS, clean_expression, reserved_tokens
from gsva.overlay import Shown, overlay_png

OVERLAY_FILE = "overlay.png"
PREDICTIONS_FILE = "predictions.json"


@dataclass
class Answer:
    """One expression's outcome: the predictor's result, or the reason it was not asked."""

    text: str
    result: Any | None = None  # gsva.predictor.ExpressionResult
    error: str | None = None

    @property
    def area(self) -> int:
        return int(self.result.mask.sum()) if self.result is not None else 0

    def line(self, number: int) -> str:
        """What the command prints for this expression."""
        if self.error is not None:
            return f"{number:>3}. error  {self.error}  \"{self.text}\""
        r = self.result
        outcome = "rejected" if r.rejected else "segmented"
        note = f"  ({r.note})" if r.note else ""
        return (f"{number:>3}. {r.decision:<4} p={r.score:.3f}  area={self.area:>7} px  {outcome:<9} "
                f"\"{self.text}\"{note}")


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) from an image file, read and decoded as the jobs do (ImageError names a bad file)."""
    return decode_image(read_image_bytes(path), name=path)


def predict_image(predictor, image: np.ndarray, expressions: list[str], mode: str = GENERATE,
                  no_target: list[bool] | None = None, max_expressions_per_prompt: int | None = EXPRESSIONS_PER_PROMPT,
                  max_chars: int = MAX_EXPRESSION_CHARS) -> list[Answer]:
    """One Answer per expression, in order: the checked ones asked in one predictor call."""
    reserved = reserved_tokens()
    answers = [Answer(text) for text in expressions]
    asked: list[int] = []
    clean: list[str] = []
    for i, text in enumerate(expressions):
        checked = clean_expression(text, max_chars, reserved)
        if checked.error is not None:
            answers[i].error = checked.error
        else:
            asked.append(i)
            clean.append(checked.text)
    if asked:
        flags = None if no_target is None else [[bool(no_target[i]) for i in asked]]
        results = predictor.predict([image], [clean], mode=mode, no_target=flags,
                                    max_expressions_per_prompt=max_expressions_per_prompt)[0]
        for i, result in zip(asked, results):
            answers[i].result = result
    return answers


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE {"size": [h, w], "counts": str} of a bool (H, W) mask."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("utf-8")}


def predictions_document(image_path: str, image: np.ndarray, answers: list[Answer], model_id: str,
                         mode: str) -> dict[str, Any]:
    """The JSON written to predictions.json: one entry per expression, masks as RLE (null on error)."""
    entries = []
    for n, a in enumerate(answers):
        r = a.result
        entries.append({
            "index": n, "text": a.text, "error": a.error,
            "decision": r.decision if r else None, "rejected": bool(r.rejected) if r else None,
            "score": float(r.score) if r else None, "area": a.area if r else None,
            "mask": rle(r.mask) if r else None,
            "forced_mask": rle(r.forced_mask) if r is not None and r.forced_mask is not None else None,
            "answer": r.answer if r else None, "note": r.note if r else None,
        })
    return {"image": image_path, "height": int(image.shape[0]), "width": int(image.shape[1]),
            "model": model_id, "mode": mode, "expressions": entries}


def write_outputs(out_dir: str, image_path: str, image: np.ndarray, answers: list[Answer], model_id: str,
                  mode: str) -> tuple[str, str]:
    """Write overlay.png and predictions.json into `out_dir` (created); their paths."""
    os.makedirs(out_dir, exist_ok=True)
    shown = [Shown(f"{n + 1}. \"{a.text}\"", None if a.result is None or a.result.rejected else a.result.mask,
                   "error" if a.error else "rejected") for n, a in enumerate(answers)]
    overlay_path = os.path.join(out_dir, OVERLAY_FILE)
    with open(overlay_path, "wb") as f:
        f.write(overlay_png(image, shown, title=f"{os.path.basename(image_path)} · {mode}"))
    json_path = os.path.join(out_dir, PREDICTIONS_FILE)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(predictions_document(image_path, image, answers, model_id, mode), f, indent=1)
    return overlay_path, json_path
