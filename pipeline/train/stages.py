"""What one training stage learns: its samples, its loss, its default trainable policy and its validation.

GSVA never starts from random weights: it fine-tunes a pretrained SAM and a pretrained LLaVA. The train
job therefore runs three stages with the same Ray Train machinery (ingestion, checkpoints, resume,
reports, curve):

- ``sam``: each image's objects, each prompted by a point or a box (gsva.sam_training); 2 BCE + 0.5 DICE;
  policy ``sam`` (image encoder, prompt encoder, mask decoder).
- ``llava``: one description of the image (pipeline.prepare.formats.shapes_describe) as a conversation
  (gsva.alignment); CE; policy ``mllm`` (projector + LLM, LLaVA's stage 2), or ``projector`` (stage 1);
  CLIP stays frozen in both, as in LLaVA.
- ``clip``: every CLIP patch predicts the class (category + colour) and box of the object covering it
  (gsva.vision_pretraining), the stand-in for CLIP's own pretraining; CE + 5 L1; policy ``clip`` (the
  vision tower; the dense head trains beside it and is kept in the training state, not in the model).
- ``gsva``: up to K referring expressions of the image in one conversation (gsva.training);
  CE + 2 BCE + 0.5 DICE; policy ``lora`` from a checkpoint or the bases, ``all`` from a preset.

``clip``, ``sam`` and ``llava`` need every object of an image: ``--objects`` (the dataset's COCO
``instances.json``, pipeline.train.objects). Validation, on the val split: ``gsva`` the predictor in generate
mode scored as gRefCOCO; ``clip`` the class accuracy of object and background patches and the box L1;
``sam`` the mean IoU of point- and box-prompted masks; ``llava`` the teacher-forced accuracy of the answer
tokens.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pipeline.train.data import draw_samples


class Stage:
    """What every stage shares: no extra trained module (only the clip stage has one, its dense head)."""

    head = None

    def make_head(self, model_cfg):
        """The module that trains beside the model (kept in the training state), or None."""
        return None

    def val_samples(self, shard, batch_size: int, k: int):
        """Per fetched val batch, the samples ``draw`` makes of its decodable images (seeded by image id)."""
        for fetched in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            samples = []
            for image_id, pixels, error in zip(fetched["image_id"], fetched["pixels"], fetched["error"]):
                if not error:
                    samples += self.draw(np.asarray(pixels, dtype=np.uint8), [], image_id, k,
                                         random.Random(f"val/{image_id}"))
            yield samples


class GSVAStage(Stage):
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


class SAMStage(Stage):
    """SAM's promptable segmentation on the images' objects (the SAM base); with ``dense_weight > 0`` the
    image embedding also learns each cell's object class and box (gsva.sam_training)."""

    name = "sam"

    def __init__(self, objects, dense_weight: float = 0.0):
        self.objects = objects
        self.dense_weight = dense_weight
        self.classes = object_classes(objects) if dense_weight > 0 else {}

    def make_head(self, model_cfg):
        if self.dense_weight <= 0:
            return None
        from gsva.vision_pretraining import DenseHead

        self.head = DenseHead(model_cfg.sam.prompt_dim, len(self.classes) + 1)
        return self.head

    def _masks(self, pixels: np.ndarray, image_id: str) -> tuple[list[np.ndarray], list[int]]:
        """The image's non-empty object masks and their classes (0 when the stage has no dense head)."""
        from pipeline.train.objects import object_masks

        objects = self.objects.get(str(image_id), [])
        masks = object_masks(objects, pixels.shape[0], pixels.shape[1], keep_empty=True)
        kept = [(m, self.classes.get(_class_key(o), 0)) for m, o in zip(masks, objects) if m.any()]
        return [m for m, _ in kept], [c for _, c in kept]

    def draw(self, pixels: np.ndarray, expressions: list[dict], image_id: str, k: int, rng: random.Random):
        from gsva.sam_training import ObjectSample

        masks, labels = self._masks(pixels, image_id)
        return [ObjectSample(pixels, masks, labels)] if masks else []

    def loss(self, model, module, samples: list, tokenizer, rng: random.Random, loss_cfg, device):
        from gsva.sam_training import make_prompt_batch, prompt_loss

        batch = make_prompt_batch(samples, module.cfg, rng, dense=self.head is not None).to(device)
        return prompt_loss(module, batch, loss_cfg, self.head, self.dense_weight)

    @torch.no_grad()
    def validate(self, module, tokenizer, shard, batch_size: int, autocast_dtype,
                 max_expressions: int | None = None) -> dict[str, Any]:
        from gsva.sam_training import ObjectSample, embedding_cells, make_prompt_batch, prompted_masks
        from gsva.transforms import masks_to_original
        from gsva.vision_pretraining import dense_counts

        sums = {kind: [0.0, 0] for kind in ("point", "box")}
        cells = [0, 0]  # object cells whose class the dense head gets right, object cells
        module.eval()
        amp = torch.autocast(module.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        try:
            for fetched in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                for image_id, pixels, error in zip(fetched["image_id"], fetched["pixels"], fetched["error"]):
                    image = np.asarray(pixels, dtype=np.uint8)
                    masks, labels = ([], []) if error else self._masks(image, image_id)
                    if not masks:
                        continue
                    embedding = None  # one SAM image encoding (and dense scoring) serves both prompt kinds
                    for kind, total in sums.items():
                        rng = random.Random(f"val/{image_id}")
                        dense = self.head is not None and embedding is None
                        batch = make_prompt_batch([ObjectSample(image, masks, labels)], module.cfg, rng,
                                                  kinds=(kind,), dense=dense).to(module.device)
                        with amp:
                            if embedding is None:
                                embedding = module.encode_sam(batch.sam_pixels)[0]
                                if dense:
                                    counts = dense_counts(*self.head(embedding_cells(embedding[None])),
                                                          batch.cell_labels, batch.cell_boxes)
                                    cells[0] += counts["class_correct"]
                                    cells[1] += counts["object_patches"]
                            low = prompted_masks(module.sam, embedding, kind, batch.prompts[0])
                        pred = masks_to_original(low.float(), batch.resized[0], batch.original[0],
                                                 module.cfg.sam.image_size) > 0
                        for p, t in zip(pred, batch.targets[0]):
                            t = t.bool()
                            total[0] += float((p & t).sum() / (p | t).sum().clamp(min=1))
                            total[1] += 1
        finally:
            module.train()
        merged = all_sum([v for kind in sums.values() for v in kind] + cells, module.device)
        out = {f"val/{kind}_iou": merged[2 * i] / max(merged[2 * i + 1], 1) for i, kind in enumerate(sums)}
        if self.head is not None:
            out["val/object_cell_acc"] = merged[-2] / max(merged[-1], 1)
        return out


class LLaVAStage(Stage):
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
            for samples in self.val_samples(shard, batch_size,
                                            max_expressions or module.cfg.max_expressions_per_prompt):
                if samples:
                    with amp:
                        c, n = answer_accuracy(module, make_text_batch(samples, tokenizer, module.cfg,
                                                                       module.token_ids).to(module.device))
                    correct, total = correct + c, total + n
        finally:
            module.train()
        correct, total = all_sum([correct, total], module.device)
        return {"val/answer_token_acc": correct / max(total, 1)}


class CLIPStage(Stage):
    """Dense object recognition on CLIP's patch features (the pretrained CLIP GSVA's LLaVA reads)."""

    name = "clip"

    def __init__(self, objects):
        self.objects = objects
        self.classes = object_classes(objects)

    def make_head(self, model_cfg):
        from gsva.vision_pretraining import DenseHead

        self.head = DenseHead(model_cfg.vision.hidden_size, len(self.classes) + 1)
        return self.head

    def draw(self, pixels: np.ndarray, expressions: list[dict], image_id: str, k: int, rng: random.Random):
        from gsva.vision_pretraining import DenseSample
        from pipeline.train.objects import object_masks

        objects = self.objects.get(str(image_id), [])
        masks = object_masks(objects, pixels.shape[0], pixels.shape[1], keep_empty=True)
        kept = [(m, self.classes[_class_key(o)]) for m, o in zip(masks, objects) if m.any()]
        return [DenseSample(pixels, [m for m, _ in kept], [c for _, c in kept])] if kept else []

    def loss(self, model, module, samples: list, tokenizer, rng: random.Random, loss_cfg, device):
        from gsva.losses import LossParts
        from gsva.vision_pretraining import dense_loss, make_dense_batch

        total, ce, l1 = dense_loss(module, self.head, make_dense_batch(samples, module.cfg.vision).to(device))
        zero = l1.new_zeros(())  # the box L1 is in the total and in validation (val/box_l1)
        return LossParts(total=total, ce=ce, bce=zero, dice=zero, num_masks=0)

    @torch.no_grad()
    def validate(self, module, tokenizer, shard, batch_size: int, autocast_dtype,
                 max_expressions: int | None = None) -> dict[str, Any]:
        from gsva.vision_pretraining import dense_accuracy, make_dense_batch

        keys = ("object_patches", "class_correct", "background_patches", "background_correct", "box_l1_sum")
        sums = dict.fromkeys(keys, 0.0)
        module.eval()
        self.head.eval()
        amp = torch.autocast(module.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        try:
            for samples in self.val_samples(shard, batch_size, 1):
                if samples:
                    with amp:
                        counts = dense_accuracy(module, self.head, make_dense_batch(samples, module.cfg.vision)
                                                .to(module.device))
                    for key in keys:
                        sums[key] += counts[key]
        finally:
            module.train()
            self.head.train()
        merged = dict(zip(keys, all_sum([sums[k] for k in keys], module.device)))
        return {"val/object_patch_acc": merged["class_correct"] / max(merged["object_patches"], 1),
                "val/background_patch_acc": merged["background_correct"] / max(merged["background_patches"], 1),
                "val/box_l1": merged["box_l1_sum"] / max(merged["object_patches"], 1)}


def object_classes(objects) -> dict[tuple[str, ...], int]:
    """Class id (>= 1; 0 is background) of every object class of the index, in a fixed order."""
    keys = sorted({_class_key(o) for image in objects.values() for o in image})
    return {key: i + 1 for i, key in enumerate(keys)}


def _class_key(obj) -> tuple[str, ...]:
    """An object's class for the dense head: its category and attributes (Shapes-GRES: shape + colour)."""
    return (obj.category, *(f"{k}={v}" for k, v in sorted(obj.attributes.items())))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over the workers (every worker gets them); the values themselves when alone."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def build_stage(name: str, objects=None, dense_weight: float = 0.0):
    """The stage object for a run (``objects``: the ObjectIndex the pretraining stages need;
    ``dense_weight``: the sam stage's dense loss, gsva.sam_training)."""
    kinds = {"gsva": GSVAStage, "clip": CLIPStage, "sam": SAMStage, "llava": LLaVAStage}
    if name not in kinds:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(kinds)}")
    if dense_weight and name != "sam":
        raise ValueError(f"a dense weight applies to the sam stage only, not {name!r}")
    return SAMStage(objects, dense_weight) if name == "sam" else kinds[name](objects)
