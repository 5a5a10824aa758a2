"""Validation during training: the real predictor (generate mode) on the val split, scored by pipeline.score.metrics.

Each worker predicts its share of the validation shard with ``GSVAPredictor`` exactly as annotation does
(forced-answer decoding, masks at original size), scores it with the scoring code's per-expression
function under the gRefCOCO (ReLA) protocol and merges the workers' ``ScoreStats`` sums, so every worker
returns the metrics of the whole validation set.

Under FSDP the model is unsharded for the pass (every worker holds the full weights for a moment) and
nothing reshards until it ends: generation makes a different number of forward calls per worker, which
must not be collectives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from gsva.config import GENERATE
from pipeline import masks as rle
from pipeline.score.metrics import ExpressionInputs, ScoreStats, score_expressions
from pipeline.train.data import labelled

PROTOCOL = "rela"
REPORTED = ("giou", "ciou", "n_acc", "t_acc")


@contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Gather every FSDP2 unit for local (non-collective) forward passes; a no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def expression_inputs(rows: list[tuple[list[dict[str, Any]], list[Any]]]) -> ExpressionInputs:
    """Ground truth + predictor results of several images -> the scoring code's input block."""
    import pyarrow as pa

    from pipeline.score.masks import BOXES_TYPE, Masks, enclosing_boxes

    exprs = [e for es, _ in rows for e in es]
    results = [r for _, rs in rows for r in rs]
    gt = [e["gt_mask"] for e in exprs]
    no_target = np.array([bool(e["no_target"]) if e.get("no_target") is not None else rle.area(g) == 0
                          for e, g in zip(exprs, gt)], dtype=bool)
    boxes = pa.array([e.get("gt_boxes") or None for e in exprs], type=BOXES_TYPE)
    return ExpressionInputs(
        no_target=no_target, gt_mask=Masks.from_rles(gt), gt_box=enclosing_boxes(boxes),
        failed=np.zeros(len(exprs), dtype=bool), rejected=np.array([r.rejected for r in results], dtype=bool),
        mask=Masks.from_rles([rle.encode(r.mask) for r in results]), forced_mask=Masks.from_rles([None] * len(exprs)))


def validate_shard(model: torch.nn.Module, tokenizer, shard: Any, batch_size: int,
                   autocast_dtype: torch.dtype | None, max_expressions: int | None = None) -> ScoreStats:
    """Predict and score this worker's validation shard (``model``: the unwrapped GSVA module)."""
    from gsva.predictor import GSVAPredictor

    predictor = GSVAPredictor(model, tokenizer, model_id="training")  # puts the model in eval mode
    device = model.device
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    stats = ScoreStats()
    try:
        for fetched in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            images, exprs = [], []
            for pixels, expressions, error in zip(fetched["pixels"], fetched["expressions"], fetched["error"]):
                usable = labelled(expressions)
                if not error and usable:
                    images.append(np.asarray(pixels, dtype=np.uint8))
                    exprs.append(usable)
            if not images:
                continue
            with amp:
                results = predictor.predict(images, [[e["text"] for e in es] for es in exprs], mode=GENERATE,
                                            max_expressions_per_prompt=max_expressions)
            inputs = expression_inputs(list(zip(exprs, results)))
            scores = score_expressions(inputs, PROTOCOL)
            stats = stats + ScoreStats.from_scores(scores, rec_target=~inputs.no_target)
    finally:
        model.train()
    return stats


def merge_across_workers(stats: ScoreStats) -> ScoreStats:
    """Sum every worker's ScoreStats (mergeable sums: order does not matter)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    gathered: list[dict | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, stats.to_dict())
    total = ScoreStats()
    for part in gathered:
        total = total + ScoreStats.from_dict(part)
    return total


def summary(stats: ScoreStats) -> dict[str, float | int | None]:
    """The reported validation numbers, keyed ``val/<metric>``."""
    metrics = stats.metrics()
    return {f"val/{k}": metrics[k] for k in (*REPORTED, "count")}
