"""Losses, trainable policies, and a few optimiser steps on a fixed batch driving the loss down."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from gsva.builder import build_model
from gsva.config import preset
from gsva.freeze import freeze, has_lora
from gsva.losses import LossConfig, bce_per_mask, dice_per_mask, gsva_loss
from gsva.tokens import build_builtin_tokenizer
from gsva.training import Sample, make_batch, training_loss


def shapes_sample(h: int, w: int, seed: int) -> Sample:
    """A grey image with a red square and a blue disc; expressions for both and a no-target one."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 200, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    square = (abs(yy - h // 3) <= 6) & (abs(xx - w // 3) <= 6)
    disc = (yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 <= 49
    image[square] = (220, 40, 40)
    image[disc] = (40, 80, 220)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return Sample(image, ["the red square", "the blue circle", "the green triangle"],
                  [square, disc, np.zeros((h, w), dtype=bool)])


def test_mask_losses_match_the_official_formulas():
    pred = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = pred.sigmoid()
    expected_bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert float(bce_per_mask(pred, target)) == pytest.approx(float(expected_bce), rel=1e-6)
    expected_dice = 1 - (2 * (p * target).sum() / 1000 + 1e-6) / (p.sum() / 1000 + target.sum() / 1000 + 1e-6)
    assert float(dice_per_mask(pred, target, 1000.0, 1e-6)) == pytest.approx(float(expected_dice), rel=1e-6)
    logits = torch.zeros(1, 3, 5)
    labels = torch.tensor([[-100, 1, 2]])
    drop = gsva_loss(logits, labels, [pred], [target], rej_sizes=[(10, 20)])
    official = gsva_loss(logits, labels, [pred], [target], rej_sizes=[(10, 20)], cfg=LossConfig(rej_rows="official"))
    assert drop.num_masks == 1 and official.num_masks == 2
    assert float(drop.ce) == pytest.approx(math.log(5))
    assert float(official.bce) == pytest.approx((float(expected_bce) + math.log(2)) / 2, rel=1e-6)
    rej_dice = 1 - 1e-6 / (0.5 * 200 / 1000 + 1e-6)
    assert float(official.dice) == pytest.approx((float(expected_dice) + rej_dice) / 2, rel=1e-6)
    assert float(drop.total) == pytest.approx(float(drop.ce) + 2 * float(drop.bce) + 0.5 * float(drop.dice), rel=1e-6)


def test_trainable_policies():
    cfg = preset("tiny")
    model = build_model(cfg)
    all_params = freeze(model, "all")
    assert all_params["trainable"] == all_params["total"]
    llm = freeze(model, "llm")
    llm_sam = freeze(model, "llm-sam")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("sam.image_encoder.") for n in trainable)
    assert not any(n.startswith(("sam.prompt_encoder.", "mllm.model.vision_tower.")) for n in trainable)
    assert llm_sam["trainable"] == llm["trainable"] + sum(p.numel() for p in model.sam.image_encoder.parameters())
    lora = freeze(model, "lora")
    assert has_lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and "mllm.lm_head.weight" in trainable
    assert any(n.startswith("sam.mask_decoder.") for n in trainable)
    assert not any(n.startswith(("sam.image_encoder.", "sam.prompt_encoder.", "mllm.model.vision_tower.",
                                 "mllm.model.multi_modal_projector.")) for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    assert lora["trainable"] < llm["trainable"] < all_params["total"]
    with pytest.raises(ValueError, match="policy"):
        freeze(model, "some")


@pytest.mark.parametrize("policy, autocast", [("lora", None), ("llm-sam", None), ("all", None),
                                              ("llm-sam", torch.bfloat16)])  # make shapes-model: bf16 on CPU
def test_a_few_steps_on_a_fixed_batch_drive_the_loss_down(policy, autocast):
    cfg = preset("tiny")
    model = build_model(cfg)
    freeze(model, policy)
    model.train()
    tok = build_builtin_tokenizer(cfg)
    batch = make_batch([shapes_sample(48, 64, 0), shapes_sample(56, 40, 1)], tok, cfg, model.token_ids,
                       random.Random(0))
    assert len(batch.seg_targets) == 4 and len(batch.rej_sizes) == 2
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95))
    torch.manual_seed(0)
    history = []
    for _ in range(12):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            parts = training_loss(model, batch)
        opt.zero_grad()
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(parts.as_floats())
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"]
    assert last["ce"] < first["ce"] and last["bce"] + last["dice"] < first["bce"] + first["dice"]
