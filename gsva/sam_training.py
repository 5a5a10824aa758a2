"""SAM's own task, the pretraining that makes the SAM base: a point or a box on one object -> that object's mask.

Real GSVA starts from a SAM that already segments whatever a prompt points at; this is that training for a
preset SAM (image encoder, prompt encoder, mask decoder), on instance masks. Per image one prompt kind is
drawn (``point``: one pixel drawn uniformly inside the object, label 1; ``box``: the object's box with each
side moved by up to ``box_jitter`` of its size), every object of the image is one prompt of that kind, and
the decoder runs once per image with its prompts batched, ``multimask_output=False`` (the single-mask output
GSVA uses). Loss: SAM-style masks-only GSVA loss (2 BCE + 0.5 DICE at the original resolution, gsva.losses).
Coordinates go to the prompt encoder in the SAM input frame (original scaled by the resize of
gsva.transforms, as segment_anything's ``ResizeLongestSide.apply_coords``).

Optionally (``dense_weight > 0``) every cell of the image embedding also predicts the class and box of the object
covering it (gsva.vision_pretraining's dense head and loss, in SAM's input frame): the stand-in for the
semantic richness real SAM's encoder brings from its MAE pretraining and SA-1B, which a decoder needs to find
"the red circle" from a text prompt. The head is a training device only; the SAM base keeps the encoder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from gsva.losses import LossConfig, LossParts, bce_per_mask, dice_per_mask
from gsva.transforms import masks_to_original, prepare_images, sam_frame_masks
from gsva.vision_pretraining import cell_targets, dense_terms

PROMPT_KINDS = ("point", "box")
BOX_JITTER = 0.1  # fraction of the box side each edge may move (SAM trains on noisy boxes)


@dataclass
class ObjectSample:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    masks: list[np.ndarray]  # bool (H, W), one per object (non-empty)
    labels: list[int] = field(default_factory=list)  # per object, class id >= 1 (only for the dense loss)


@dataclass
class PromptBatch:
    sam_pixels: torch.Tensor  # (N, 3, S, S)
    kinds: list[str]  # per image: "point" or "box"
    prompts: list[torch.Tensor]  # per image: (M, 2) points or (M, 4) boxes, SAM input frame
    targets: list[list[torch.Tensor]]  # per image: M (H, W) float masks
    resized: list[tuple[int, int]]
    original: list[tuple[int, int]]
    cell_labels: torch.Tensor | None = None  # (N, g * g) long, 0 = background (with the dense loss)
    cell_boxes: torch.Tensor | None = None  # (N, g * g, 4)

    def to(self, device) -> PromptBatch:
        cells = [None if t is None else t.to(device) for t in (self.cell_labels, self.cell_boxes)]
        return PromptBatch(self.sam_pixels.to(device), self.kinds, [p.to(device) for p in self.prompts],
                           [[t.to(device) for t in ts] for ts in self.targets], self.resized, self.original,
                           *cells)


def point_in(mask: np.ndarray, rng: random.Random) -> tuple[float, float]:
    """(x, y) of a pixel drawn uniformly inside the mask."""
    ys, xs = np.nonzero(mask)
    i = rng.randrange(len(xs))
    return float(xs[i]), float(ys[i])


def jittered_box(mask: np.ndarray, rng: random.Random, jitter: float = BOX_JITTER) -> tuple[float, ...]:
    """(x0, y0, x1, y1) of the mask's box, each edge moved by up to ``jitter`` x the side, clipped to the image."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
    w, h = x1 - x0, y1 - y0
    moved = [x0 + rng.uniform(-jitter, jitter) * w, y0 + rng.uniform(-jitter, jitter) * h,
             x1 + rng.uniform(-jitter, jitter) * w, y1 + rng.uniform(-jitter, jitter) * h]
    height, width = mask.shape
    return (min(max(moved[0], 0.0), width), min(max(moved[1], 0.0), height),
            min(max(moved[2], 0.0), width), min(max(moved[3], 0.0), height))


def embedding_targets(samples: list[ObjectSample], sam_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, g * g) labels and (N, g * g, 4) boxes of the image embedding's cells (see the module docstring)."""
    labels, boxes = zip(*(cell_targets(sam_frame_masks(s.masks, sam_cfg), s.labels, sam_cfg.embedding_size)
                          for s in samples))
    return torch.stack(labels), torch.stack(boxes)


def make_prompt_batch(samples: list[ObjectSample], model_cfg, rng: random.Random,
                      kinds: tuple[str, ...] = PROMPT_KINDS, dense: bool = False) -> PromptBatch:
    """Images -> SAM inputs, one prompt per object (kind drawn per image), targets at the original size;
    ``dense``: the embedding cells' class and box targets too (the samples need ``labels``)."""
    prepared = prepare_images([s.image for s in samples], model_cfg)
    drawn, prompts, targets = [], [], []
    for s, (h, w), (height, width) in zip(samples, prepared.resized, prepared.original):
        if not s.masks:
            raise ValueError("an object sample needs at least one object mask")
        kind = rng.choice(kinds)
        scale = torch.tensor([w / width, h / height] * (1 if kind == "point" else 2))
        coords = [point_in(m, rng) if kind == "point" else jittered_box(m, rng) for m in s.masks]
        drawn.append(kind)
        prompts.append(torch.tensor(coords, dtype=torch.float32) * scale)
        targets.append([torch.from_numpy(np.asarray(m, dtype=np.float32)) for m in s.masks])
    batch = PromptBatch(prepared.sam_pixels, drawn, prompts, targets, prepared.resized, prepared.original)
    if dense:
        if any(len(s.labels) != len(s.masks) for s in samples):
            raise ValueError("the dense loss needs one class label per object mask")
        batch.cell_labels, batch.cell_boxes = embedding_targets(samples, model_cfg.sam)
    return batch


def prompted_masks(sam, embedding: torch.Tensor, kind: str, prompts: torch.Tensor) -> torch.Tensor:
    """(D, g, g) image embedding + M prompts of one kind -> (M, L, L) low-res mask logits."""
    if kind == "point":
        labels = torch.ones(prompts.shape[0], 1, dtype=torch.long, device=prompts.device)
        sparse, dense = sam.prompt_encoder(points=(prompts[:, None], labels), boxes=None, masks=None)
    else:
        sparse, dense = sam.prompt_encoder(points=None, boxes=prompts, masks=None)
    masks, _ = sam.mask_decoder(image_embeddings=embedding[None], image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)
    return masks[:, 0]


def embedding_cells(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D, g, g) image embeddings -> (N, g * g, D), row-major like the cell targets."""
    return embeddings.flatten(2).transpose(1, 2)


def prompt_loss(model, batch: PromptBatch, cfg: LossConfig = LossConfig(), head=None,
                dense_weight: float = 0.0) -> LossParts:
    """Mask loss of every prompt of the batch, averaged over prompts; with a dense ``head``, plus
    ``dense_weight`` x the cells' class CE + 5 box L1 (the CE part reports the class CE; else 0: no text)."""
    sam = model.sam
    embeddings = model.encode_sam(batch.sam_pixels)
    bce = dice = embeddings.new_zeros(())
    rows = 0
    for n, (kind, prompts, targets) in enumerate(zip(batch.kinds, batch.prompts, batch.targets)):
        low = prompted_masks(sam, embeddings[n], kind, prompts)
        preds = masks_to_original(low, batch.resized[n], batch.original[n], model.cfg.sam.image_size)
        for pred, target in zip(preds, targets):
            bce = bce + bce_per_mask(pred, target)
            dice = dice + dice_per_mask(pred, target, cfg.dice_scale, cfg.eps)
            rows += 1
    bce, dice = bce / max(rows, 1), dice / max(rows, 1)
    total, ce = cfg.bce_weight * bce + cfg.dice_weight * dice, bce.new_zeros(())
    if head is not None:
        logits, boxes = head(embedding_cells(embeddings))
        dense, ce, _ = dense_terms(logits, boxes, batch.cell_labels, batch.cell_boxes)
        total = total + dense_weight * dense
    return LossParts(total=total, ce=ce, bce=bce, dice=dice, num_masks=rows)
