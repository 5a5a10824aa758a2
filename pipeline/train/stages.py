"""What one training stage learns: its samples, its loss, its default trainable policy and its validation.

GSVA never starts from random weights: it fine-tunes a pretrained SAM and a pretrained LLaVA. The train
job therefore runs three stages with the same Ray Train machinery (ingestion, checkpoints, resume,
reports, curve):

- ``sam``: each image's objects, each prompted by a point or a box (gsva.sam_training); 2 BCE + 0.5 DICE;
  policy ``sam`` (image encoder, prompt encoder, mask decoder).
- ``llava``: one description of the image (pipeline.prepare.formats.shapes_describe) as a conversation
  (gsva.alignment); CE; policy ``mllm`` (CLIP, projector, LLM), or ``vision`` (LLaVA's stage 1).
- ``gsva``: up to K referring expressions of the image in one conversation (gsva.training);
  CE + 2 BCE + 0.5 DICE; policy ``lora`` from a checkpoint or the bases, ``all`` from a preset.

``sam`` and ``llava`` need every object of an image: ``--objects`` (the dataset's COCO ``instances.json``,
pipeline.train.objects). Validation, on the val split: ``gsva`` the predictor in generate mode scored as
gRefCOCO; ``sam`` the mean IoU of point- and box-prompted masks; ``llava`` the teacher-forced accuracy of
the answer tokens.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pipeline.train.data import draw_samples


class GSVAStage:
    """GSVA's own fine-tuning (the default stage)."""

    name = "gsva"

    def __init__(self, objects=None):
        del objects  # referring expressions carry their own ground truth

    def draw(self, pixels: np.ndarray, expressions: list[dict], image_id: str, k: int, rng: random.Random):
        return draw_samples(pixels, expressions, image_id, k, rng)

    def loss(self, model, module, samples: list, tokenizer, rng: random.Random, loss_cfg, device):
        from gsva.training import make_batch, training_loss

        batch = make_batch(samples, tokenizer, module.cfg, module.token_ids, rng).to(device)
        return training_loss(model, batch, loss_cfg)

    def validate(self, module, tokenizer, shard, batch_size: int, autocast_dtype,
                 max_expressions: int | None = None) -> dict[str, Any]:
        from pipeline.train.validation import merge_across_workers, summary, validate_shard

        return summary(merge_across_workers(validate_shard(module, tokenizer, shard, batch_size, autocast_dtype,
                                                           max_expressions=max_expressions)))


class SAMStage:
    """SAM's promptable segmentation on the images' objects (the SAM base)."""

    name = "sam"

    def __init__(self, objects):
        self.objects = objects

    def _masks(self, pixels: np.ndarray, image_id: str) -> list[np.ndarray]:
        from pipeline.train.objects import object_masks

        return object_masks(self.objects.get(str(image_id), []), pixels.shape[0], pixels.shape[1])

    def draw(self, pixels: np.ndarray, expressions: list[dict], image_id: str, k: int, rng: random.Random):
        from gsva.sam_training import ObjectSample

        masks = self._masks(pixels, image_id)
        return [ObjectSample(pixels, masks)] if masks else []

    def loss(self, model, module, samples: list, tokenizer, rng: random.Random, loss_cfg, device):
        from gsva.sam_training import make_prompt_batch, prompt_loss

        return prompt_loss(module, make_prompt_batch(samples, module.cfg, rng).to(device), loss_cfg)

    @torch.no_grad()
    def validate(self, module, tokenizer, shard, batch_size: int, autocast_dtype,
                 max_expressions: int | None = None) -> dict[str, Any]:
        from gsva.sam_training import ObjectSample, make_prompt_batch, prompted_masks
        from gsva.transforms import masks_to_original

        sums = {kind: [0.0, 0] for kind in ("point", "box")}
        module.eval()
        amp = torch.autocast(module.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        try:
            for fetched in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                for image_id, pixels, error in zip(fetched["image_id"], fetched["pixels"], fetched["error"]):
                    image = np.asarray(pixels, dtype=np.uint8)
                    masks = [] if error else self._masks(image, image_id)
                    if not masks:
                        continue
                    embedding = None  # one SAM image encoding serves both prompt kinds of this image
                    for kind, total in sums.items():
                        rng = random.Random(f"val/{image_id}")
                        batch = make_prompt_batch([ObjectSample(image, masks)], module.cfg, rng,
                                                  kinds=(kind,)).to(module.device)
                        with amp:
                            if embedding is None:
                                embedding = module.encode_sam(batch.sam_pixels)[0]
                            low = prompted_masks(module.sam, embedding, kind, batch.prompts[0])
                        pred = masks_to_original(low.float(), batch.resized[0], batch.original[0],
                                                 module.cfg.sam.image_size) > 0
                        for p, t in zip(pred, batch.targets[0]):
                            t = t.bool()
                            total[0] += float((p & t).sum() / (p | t).sum().clamp(min=1))
                            total[1] += 1
        finally:
            module.train()
        merged = all_sum([v for kind in sums.values() for v in kind], module.device)
        return {f"val/{kind}_iou": merged[2 * i] / max(merged[2 * i + 1], 1) for i, kind in enumerate(sums)}


class LLaVAStage:
    """LLaVA's alignment on descriptions generated from the images' annotations (the LLaVA base)."""

    name = "llava"

    def __init__(self, objects):
        self.objects = objects

    def draw(self, pixels: np.ndarray, expressions: list[dict], image_id: str, k: int, rng: random.Random):
        from gsva.alignment import TextSample
        from pipeline.prepare.formats.shapes_describe import describe, from_annotation

        objects = [from_annotation(o.category, o.attributes.get("color"), list(o.bbox))
                   for o in self.objects.get(str(image_id), [])]
        if not objects:
            return []
        question, answer = describe(objects, pixels.shape[1], pixels.shape[0], k, rng)
        return [TextSample(pixels, question, answer)]

    def loss(self, model, module, samples: list, tokenizer, rng: random.Random, loss_cfg, device):
        from gsva.alignment import make_text_batch, text_loss

        return text_loss(module, make_text_batch(samples, tokenizer, module.cfg, module.token_ids).to(device))

    @torch.no_grad()
    def validate(self, module, tokenizer, shard, batch_size: int, autocast_dtype,
                 max_expressions: int | None = None) -> dict[str, Any]:
        from gsva.alignment import answer_accuracy, make_text_batch

        correct = total = 0
        module.eval()
        amp = torch.autocast(module.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        try:
            for fetched in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                samples = []
                for image_id, pixels, error in zip(fetched["image_id"], fetched["pixels"], fetched["error"]):
                    if not error:
                        samples += self.draw(np.asarray(pixels, dtype=np.uint8), [], image_id,
                                             max_expressions or module.cfg.max_expressions_per_prompt,
                                             random.Random(f"val/{image_id}"))
                if samples:
                    with amp:
                        c, n = answer_accuracy(module, make_text_batch(samples, tokenizer, module.cfg,
                                                                       module.token_ids).to(module.device))
                    correct, total = correct + c, total + n
        finally:
            module.train()
        correct, total = all_sum([correct, total], module.device)
        return {"val/answer_token_acc": correct / max(total, 1)}


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over the workers (every worker gets them); the values themselves when alone."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def build_stage(name: str, objects=None):
    """The stage object for a run (``objects``: the ObjectIndex the pretraining stages need)."""
    kinds = {"gsva": GSVAStage, "sam": SAMStage, "llava": LLaVAStage}
    if name not in kinds:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(kinds)}")
    return kinds[name](objects)
