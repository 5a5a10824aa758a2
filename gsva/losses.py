"""GSVA's training loss: L = 1.0 * CE + 2.0 * BCE + 0.5 * DICE, masks compared at ORIGINAL resolution.

- CE: next-token cross-entropy over labelled (answer) tokens, mean over all of them in the batch.
- BCE per mask: mean over pixels of BCE-with-logits; DICE per mask: 1 - (2 sum(p t) + eps) /
  (sum p + sum t + eps) with p = sigmoid and sums scaled by 1/1000, eps 1e-6; both averaged over the
  batch's mask rows.

``[REJ]`` rows (no-target expressions). Officially they enter the mask loss as constant zero logits vs
empty targets: no gradient, but each adds BCE = log 2 and DICE ~= 1 to the sums and counts as a row, which
dilutes the [SEG] rows' gradient by the share of [REJ] rows in the batch. ``rej_rows="official"``
reproduces that (in closed form, without materialising zero masks); ``rej_rows="drop"`` (our default)
averages over [SEG] rows only, so the mask gradient does not depend on how many no-target expressions
a batch happens to hold. The [REJ] decision itself is learned by CE either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gsva.prompts import IGNORE_INDEX

REJ_ROWS = ("drop", "official")


@dataclass(frozen=True)
class LossConfig:
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    dice_scale: float = 1000.0
    eps: float = 1e-6
    rej_rows: str = "drop"

    def __post_init__(self) -> None:
        if self.rej_rows not in REJ_ROWS:
            raise ValueError(f"rej_rows must be one of {REJ_ROWS}, not {self.rej_rows!r}")


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor  # unweighted
    bce: torch.Tensor  # unweighted mean over rows
    dice: torch.Tensor  # unweighted mean over rows
    num_masks: int

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, attr).detach()) for name, attr in
                (("loss", "total"), ("ce", "ce"), ("bce", "bce"), ("dice", "dice"))}


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels (-100 ignored) -> mean next-token CE."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def bce_per_mask(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(H, W) logits vs (H, W) {0,1} -> mean BCE over pixels."""
    return F.binary_cross_entropy_with_logits(pred.float(), target.float())


def dice_per_mask(pred: torch.Tensor, target: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    p = pred.float().sigmoid().flatten()
    t = target.float().flatten()
    return 1 - (2 * (p / scale * t).sum() + eps) / ((p / scale).sum() + (t / scale).sum() + eps)


def gsva_loss(logits: torch.Tensor, labels: torch.Tensor, pred_masks: list[torch.Tensor],
              gt_masks: list[torch.Tensor], rej_sizes: list[tuple[int, int]] = (),
              cfg: LossConfig = LossConfig()) -> LossParts:
    """``pred_masks``/``gt_masks``: one (H_i, W_i) pair per [SEG] row at the image's original size;
    ``rej_sizes``: original (H, W) of each [REJ] row (used only with rej_rows="official")."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted masks vs {len(gt_masks)} targets")
    ce = ce_loss(logits, labels)
    zero = ce.new_zeros(())
    bce_sum, dice_sum = zero, zero
    for pred, gt in zip(pred_masks, gt_masks):
        if pred.shape != gt.shape:
            raise ValueError(f"mask of shape {tuple(pred.shape)} vs target {tuple(gt.shape)}")
        bce_sum = bce_sum + bce_per_mask(pred, gt)
        dice_sum = dice_sum + dice_per_mask(pred, gt, cfg.dice_scale, cfg.eps)
    rows = len(pred_masks)
    if cfg.rej_rows == "official":
        for h, w in rej_sizes:  # zero logits vs empty target: sigmoid = 1/2 on every pixel
            bce_sum = bce_sum + math.log(2.0)
            dice_sum = dice_sum + (1 - cfg.eps / (0.5 * h * w / cfg.dice_scale + cfg.eps))
        rows += len(rej_sizes)
    bce = bce_sum / max(rows, 1)
    dice = dice_sum / max(rows, 1)
    total = cfg.ce_weight * ce + cfg.bce_weight * bce + cfg.dice_weight * dice
    return LossParts(total=total, ce=ce, bce=bce, dice=dice, num_masks=rows)
