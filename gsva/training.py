"""Training samples -> model inputs -> loss: the model-side half of a training step (no Ray, no loop).

A sample is one image with up to K expressions, their ground-truth masks at the image's original size
(empty = no target) and names; it becomes one official GSVA training conversation (gsva.prompts) with a
random question/answer template where an empty target's ``[SEG]`` is ``[REJ]``. The train job
(jobs/train.py) owns sampling, the optimiser, distribution and checkpoints.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from gsva import prompts
from gsva.losses import LossConfig, LossParts, gsva_loss
from gsva.tokens import Tokenizer
from gsva.transforms import masks_to_original, prepare_images


@dataclass
class Sample:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    names: list[str]  # expressions as given (cleaned by gsva.prompts.train_names)
    masks: list[np.ndarray]  # bool (H, W) per expression; all False = no target


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor
    clip_pixels: torch.Tensor  # (N, 3, C, C)
    sam_pixels: torch.Tensor  # (N, 3, S, S)
    conv_image: torch.Tensor  # (B,) conversation -> image
    seg_targets: list[torch.Tensor]  # per [SEG] slot in row-major order: (H, W) float {0, 1}
    rej_sizes: list[tuple[int, int]]  # original size of each [REJ] slot's image
    resized: list[tuple[int, int]]
    original: list[tuple[int, int]]

    def to(self, device) -> TrainBatch:
        move = {k: getattr(self, k).to(device) for k in
                ("input_ids", "attention_mask", "labels", "clip_pixels", "sam_pixels", "conv_image")}
        return TrainBatch(**move, seg_targets=[t.to(device) for t in self.seg_targets], rej_sizes=self.rej_sizes,
                          resized=self.resized, original=self.original)


def make_batch(samples: list[Sample], tokenizer: Tokenizer, model_cfg, token_ids, rng: random.Random) -> TrainBatch:
    """One conversation per sample with random GSVA templates; targets aligned with the [SEG] slots."""
    prepared = prepare_images([s.image for s in samples], model_cfg)
    encoded, seg_targets, rej_sizes = [], [], []
    for i, s in enumerate(samples):
        if len(s.names) != len(s.masks):
            raise ValueError(f"sample {i}: {len(s.names)} expressions but {len(s.masks)} masks")
        rejected = [not bool(m.any()) for m in s.masks]
        question, answer = prompts.training_conversation(s.names, rejected, model_cfg, rng)
        prompt, answer = prompts.conversation(question, answer, model_cfg)
        encoded.append(prompts.encode(tokenizer, token_ids, prompt, answer, model_cfg))
        for m, r in zip(s.masks, rejected):
            if r:
                rej_sizes.append(prepared.original[i])
            else:
                seg_targets.append(torch.from_numpy(np.asarray(m, dtype=np.float32)))
    batch = prompts.collate(encoded, token_ids.pad)
    return TrainBatch(batch.input_ids, batch.attention_mask, batch.labels, prepared.clip_pixels,
                      prepared.sam_pixels, torch.arange(len(samples)), seg_targets, rej_sizes,
                      prepared.resized, prepared.original)


def training_loss(model, batch: TrainBatch, cfg: LossConfig = LossConfig()) -> LossParts:
    """Forward + GSVA loss with every [SEG] mask brought back to its image's original size."""
    out = model(batch.input_ids, batch.attention_mask, batch.clip_pixels, batch.sam_pixels, batch.conv_image)
    images = batch.conv_image[out.mask_rows].tolist()
    preds = [masks_to_original(m[None], batch.resized[i], batch.original[i], model.cfg.sam.image_size)[0]
             for m, i in zip(out.mask_logits, images)]
    return gsva_loss(out.logits, batch.labels, preds, batch.seg_targets, batch.rej_sizes, cfg)
