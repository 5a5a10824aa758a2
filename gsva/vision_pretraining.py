"""The stand-in for CLIP's own pretraining: dense object recognition on the vision tower's patch features.

Real GSVA reads a CLIP ViT pretrained on 400M image-text pairs, whose patch features already say what is
where; LLaVA then trains only the projector (stage 1) and the projector + LLM (stage 2) on top of a frozen
CLIP. A preset's CLIP is random, and trained only through the language loss it learned colour but not
shape (a linear probe read shape from the LLaVA base's tokens at chance). This stage gives it the
pretrained features first: every patch of the CLIP input predicts, from the features LLaVA's projector
reads (hidden layer ``feature_layer``, CLS dropped), the class of the object covering most of it
(``0`` = background) and that object's box (centre x, centre y, width, height as fractions of the CLIP
input). The head is a training device only, like CLIP's text tower after pretraining: the checkpoint
keeps the vision tower.

Targets go through the same geometry as the image (``gsva.transforms.clip_frame``: centre crop or pad), so
a patch's label is what that patch shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from gsva.config import VisionConfig
from gsva.transforms import clip_frame, clip_input, to_rgb_uint8

BOX_DIMS = 4  # centre x, centre y, width, height (fractions of the CLIP input)
MIN_COVER = 1 / 16  # a patch is an object's when that object covers at least this fraction of it


@dataclass
class DenseSample:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    masks: list[np.ndarray]  # bool (H, W), one per object
    labels: list[int]  # per object, class id >= 1 (0 is background)


@dataclass
class DenseBatch:
    clip_pixels: torch.Tensor  # (N, 3, C, C)
    labels: torch.Tensor  # (N, P) long, 0 = background
    boxes: torch.Tensor  # (N, P, 4) float, meaningful where labels > 0

    def to(self, device) -> DenseBatch:
        return DenseBatch(*(t.to(device) for t in (self.clip_pixels, self.labels, self.boxes)))


class DenseHead(nn.Module):
    """Per-patch class logits and box from the vision features (B, P, D) -> (B, P, classes), (B, P, 4)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.classes = nn.Linear(hidden_size, num_classes)
        self.box = nn.Linear(hidden_size, BOX_DIMS)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(features)
        return self.classes(x), self.box(x).sigmoid()


def view_masks(masks: list[np.ndarray], cfg: VisionConfig) -> np.ndarray:
    """(M, C, C) float coverage of each object in CLIP's view (gsva.transforms.clip_frame, bilinear)."""
    if not masks:
        return np.zeros((0, cfg.image_size, cfg.image_size), dtype=np.float32)
    return np.stack([np.asarray(clip_frame(Image.fromarray(m.astype(np.uint8) * 255), cfg, Image.BILINEAR, 0),
                                dtype=np.float32) / 255.0 for m in masks])


def patch_targets(sample: DenseSample, cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) labels and (P, 4) boxes of one image: per patch the object covering most of it."""
    return cell_targets(view_masks(sample.masks, cfg), sample.labels, cfg.image_size // cfg.patch_size)


def cell_targets(cover: np.ndarray, labels: list[int], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid * grid,) labels and (grid * grid, 4) boxes from (M, S, S) object coverage in a model's square
    view (CLIP's patches, SAM's embedding cells): per cell the object covering most of it, if it covers at
    least ``MIN_COVER``; boxes as fractions of S."""
    size = cover.shape[-1] if len(cover) else grid
    cell = size // grid
    out_labels = torch.zeros(grid * grid, dtype=torch.long)
    boxes = torch.zeros(grid * grid, BOX_DIMS)
    if not len(cover):
        return out_labels, boxes
    per_cell = cover.reshape(len(cover), grid, cell, grid, cell).mean(axis=(2, 4)).reshape(len(cover), -1)
    best = per_cell.argmax(0)
    for o, m in enumerate(cover):
        ys, xs = np.nonzero(m > 0.5)
        if not len(xs):
            continue  # outside the view (cut by CLIP's centre crop): nothing to see
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        box = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32) / size
        mine = torch.from_numpy((best == o) & (per_cell[o] >= MIN_COVER))
        out_labels[mine] = labels[o]
        boxes[mine] = box
    return out_labels, boxes


def make_dense_batch(samples: list[DenseSample], cfg: VisionConfig) -> DenseBatch:
    pixels, labels, boxes = [], [], []
    for i, s in enumerate(samples):
        pixels.append(clip_input(to_rgb_uint8(s.image, f"image {i}"), cfg))
        lab, box = patch_targets(s, cfg)
        labels.append(lab)
        boxes.append(box)
    return DenseBatch(torch.stack(pixels), torch.stack(labels), torch.stack(boxes))


def patch_features(model, clip_pixels: torch.Tensor) -> torch.Tensor:
    """(N, P, D) vision features at ``feature_layer``, CLS dropped: what LLaVA's projector reads."""
    tower = model.mllm.model.vision_tower
    out = tower(clip_pixels.to(model.dtype), output_hidden_states=True)
    return out.hidden_states[model.cfg.vision.feature_layer][:, 1:]


def dense_outputs(model, head: DenseHead, batch: DenseBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return head(patch_features(model, batch.clip_pixels))


def dense_loss(model, head: DenseHead, batch: DenseBatch, box_weight: float = 5.0):
    """(total, class CE, box L1): CE over every patch, L1 on the patches that belong to an object."""
    logits, boxes = dense_outputs(model, head, batch)
    return dense_terms(logits, boxes, batch.labels, batch.boxes, box_weight)


def dense_terms(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
                box_weight: float = 5.0):
    """(total, class CE, box L1) of (N, P, classes) logits and (N, P, 4) boxes against (N, P) labels."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    on = labels > 0
    l1 = F.l1_loss(boxes[on].float(), target_boxes[on]) if on.any() else boxes.sum() * 0
    return ce + box_weight * l1, ce, l1


@torch.no_grad()
def dense_accuracy(model, head: DenseHead, batch: DenseBatch) -> dict[str, int | float]:
    """Counts over object patches: class correct, and the summed box L1 (for a mean across batches)."""
    logits, boxes = dense_outputs(model, head, batch)
    return dense_counts(logits, boxes, batch.labels, batch.boxes)


def dense_counts(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                 target_boxes: torch.Tensor) -> dict[str, int | float]:
    on = labels > 0
    return {"object_patches": int(on.sum()),
            "class_correct": int((logits.argmax(-1)[on] == labels[on]).sum()),
            "background_correct": int((logits.argmax(-1)[~on] == 0).sum()), "background_patches": int((~on).sum()),
            "box_l1_sum": float((boxes[on].float() - target_boxes[on]).abs().mean(-1).sum())}
