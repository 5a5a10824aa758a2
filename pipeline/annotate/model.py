"""Model stage: one GSVA replica per Ray actor; decoded images in, exactly one prediction row per expression out.

`__init__` loads the checkpoint once per actor (a failure raises ModelLoadError, which Ray Data turns into
a failed job at once instead of a restart loop); `__call__` runs GSVA on a batch of images, each image with
all of its usable expressions, and converts every outcome, good or bad, into a row (PART_SCHEMA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gsva.config import TEACHER_FORCED
from pipeline import masks
from pipeline.annotate.rows import DECODED_SCHEMA, base_row, error_row, image_error_rows, placeholder_row, to_table
from pipeline.schemas import STATUS_ERROR, missing_columns
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)



class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the whole job stops with this message."""


@dataclass(frozen=True)
class ModelSpec:
    """What each replica loads and how it prompts."""

    checkpoint: str
    mode: str
    max_expressions_per_prompt: int | None
    storage: StorageOptions
    use_gpu: bool = False
    expected_model_id: str | None = None  # the fingerprint's identity; a replica loading other weights fails


def load_predictor(spec: ModelSpec):
    """GSVAPredictor on this process's device; ModelLoadError with the reason if anything goes wrong."""
    try:
        import torch

        from gsva.predictor import GSVAPredictor

        device = "cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu"
        if spec.use_gpu and device == "cpu":
            raise RuntimeError("GPUs were requested (--gpus-per-replica) but torch sees no CUDA device")
        # bf16 weights on GPU (as GSVA/LISA infer); fp32 on CPU, where bf16 matmuls are slow.
        dtype = torch.bfloat16 if device == "cuda" else None
        predictor = GSVAPredictor.from_checkpoint(spec.checkpoint, device=device, storage=spec.storage, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - one clear message for the job, the cause chained
        raise ModelLoadError(f"cannot load the model from {spec.checkpoint!r}: {type(exc).__name__}: {exc}") from exc
    if spec.expected_model_id is not None and str(predictor.model_id) != spec.expected_model_id:
        raise ModelLoadError(f"the weights at {spec.checkpoint!r} changed since the job started: replica loaded "
                             f"{predictor.model_id}, the output's fingerprint says {spec.expected_model_id}")
    return predictor


class PredictStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.predictor = self.load(spec)
        self.model_id = str(self.predictor.model_id)
        self._checked = False

    def load(self, spec: ModelSpec) -> Any:
        """The predictor of this replica (a test subclass may return a fake segmenter here)."""
        return load_predictor(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._checked:
            missing = missing_columns(batch.schema, DECODED_SCHEMA)
            if missing:
                raise ValueError(f"model stage input lacks the columns {missing}")
            self._checked = True
        images = batch.to_pylist()
        runnable = [img for img in images if self._runnable(img)]
        outcomes = self._predict(runnable)
        rows: list[dict[str, Any]] = []
        for image in images:
            rows.extend(self._rows(image, outcomes.get(id(image))))
        return to_table(rows)

    # ------------------------------------------------------------------------------------------------ steps
    def _runnable(self, image: dict[str, Any]) -> bool:
        """An image with pixels and at least one usable expression (teacher-forced: with ground truth)."""
        if image["image_error"] is not None:
            return False
        return any(self._usable(e) for e in image["expressions"] or [])

    def _usable(self, expression: dict[str, Any]) -> bool:
        if expression["error"] is not None:
            return False
        return self.spec.mode != TEACHER_FORCED or expression["no_target"] is not None

    def _predict(self, images: list[dict[str, Any]]) -> dict[int, Any]:
        """id(image) -> list of ExpressionResult (usable expressions, in order) or the exception it raised.

        The whole batch goes to the model in one call; if that raises, each image is retried alone so one
        poisonous image costs only its own rows.
        """
        if not images:
            return {}
        try:
            results = self._call_model(images)
            return {id(img): res for img, res in zip(images, results)}
        except Exception as exc:  # noqa: BLE001 - isolated below, image by image
            log.warning("batch of %d images failed (%s); retrying one by one", len(images), exc)
        outcomes: dict[int, Any] = {}
        for img in images:
            try:
                outcomes[id(img)] = self._call_model([img])[0]
            except Exception as exc:  # noqa: BLE001 - becomes this image's error rows
                outcomes[id(img)] = exc
        return outcomes

    def _call_model(self, images: list[dict[str, Any]]) -> list[list[Any]]:
        pixels = [np.frombuffer(img["pixels"], dtype=np.uint8).reshape(img["height"], img["width"], 3)
                  for img in images]
        usable = [[e for e in img["expressions"] if self._usable(e)] for img in images]
        no_target = [[bool(e["no_target"]) for e in exprs] for exprs in usable] \
            if self.spec.mode == TEACHER_FORCED else None
        results = self.predictor.predict(pixels, [[e["text"] for e in exprs] for exprs in usable],
                                         mode=self.spec.mode, no_target=no_target,
                                         max_expressions_per_prompt=self.spec.max_expressions_per_prompt)
        for exprs, res in zip(usable, results):
            if len(res) != len(exprs):
                raise RuntimeError(f"the model returned {len(res)} results for {len(exprs)} expressions")
        return results

    def _rows(self, image: dict[str, Any], outcome: Any) -> list[dict[str, Any]]:
        model, mode = self.model_id, self.spec.mode
        if image["image_error"] is not None:
            return image_error_rows(image, model, mode, image["image_error"])
        if isinstance(outcome, Exception):
            return image_error_rows(image, model, mode, f"model failed on this image: "
                                                        f"{type(outcome).__name__}: {outcome}")
        if not image["expressions"]:
            return [placeholder_row(image, model, mode)]
        results = iter(outcome or [])
        rows = []
        for pos, expr in enumerate(image["expressions"] or []):
            first = pos == 0
            if expr["error"] is not None:
                rows.append(error_row(image, expr, pos, first, model, mode, expr["error"]))
            elif not self._usable(expr):
                rows.append(error_row(image, expr, pos, first, model, mode,
                                      "teacher-forced mode needs the ground truth no_target of every expression"))
            else:
                rows.append(self._result_row(image, expr, pos, first, next(results)))
        return rows

    def _result_row(self, image: dict[str, Any], expr: dict[str, Any], pos: int, first: bool,
                    result: Any) -> dict[str, Any]:
        row = base_row(image, expr, pos, first, self.model_id, self.spec.mode)
        try:
            row.update(rejected=bool(result.rejected), mask=masks.encode(np.asarray(result.mask, dtype=bool)),
                       forced_mask=None if result.forced_mask is None
                       else masks.encode(np.asarray(result.forced_mask, dtype=bool)),
                       score=float(result.score), answer=result.answer, note=_note(result))
        except Exception as exc:  # noqa: BLE001 - a malformed result is this expression's error
            row.update(status=STATUS_ERROR, error=f"cannot encode the model output: {type(exc).__name__}: {exc}",
                       rejected=None, mask=None, forced_mask=None, score=None)
        return row


def _note(result: Any) -> str | None:
    """The predictor's remark, or the flag for an answer with neither [SEG] nor [REJ] in the slot."""
    if result.note:
        return str(result.note)
    if result.decision == "none":
        return "neither [SEG] nor [REJ] was generated for this expression; treated as rejected"
    return None
