"""LLaVA's vision-language alignment, the pretraining that makes the LLaVA base: image + question -> answer text.

The MLLM half of GSVA only (CLIP, projector, LLM; SAM never runs): each sample is one ``llava_v1``
conversation (gsva.prompts, the same template GSVA fine-tunes and evaluates with) whose answer is trained
with next-token cross-entropy, exactly as LLaVA's stage 1 (projector, here with CLIP, since a preset's CLIP
is random) and stage 2 (projector + LLM) train. Which parameters learn is the train job's policy
(gsva.freeze ``vision`` / ``mllm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gsva import prompts
from gsva.losses import LossParts, ce_loss
from gsva.prompts import IGNORE_INDEX
from gsva.tokens import Tokenizer
from gsva.transforms import clip_input, to_rgb_uint8


@dataclass
class TextSample:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    question: str
    answer: str


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor
    clip_pixels: torch.Tensor  # (B, 3, C, C)

    def to(self, device) -> TextBatch:
        return TextBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                  self.clip_pixels)))


def make_text_batch(samples: list[TextSample], tokenizer: Tokenizer, model_cfg, token_ids) -> TextBatch:
    """One conversation per sample; only the answer (and ``</s>``) is labelled."""
    encoded = []
    for s in samples:  # the user message as LLaVA's: "<image>\n" + question
        prompt, answer = prompts.conversation(f"{model_cfg.tokens.image}\n{s.question}", s.answer, model_cfg)
        encoded.append(prompts.encode(tokenizer, token_ids, prompt, answer, model_cfg))
    batch = prompts.collate(encoded, token_ids.pad)
    pixels = torch.stack([clip_input(to_rgb_uint8(s.image, f"image {i}"), model_cfg.vision)
                          for i, s in enumerate(samples)])
    return TextBatch(batch.input_ids, batch.attention_mask, batch.labels, pixels)


def answer_logits(model, batch: TextBatch) -> torch.Tensor:
    """(B, T, V) logits of the conversations (CLIP tokens in place of <image>; SAM does not run)."""
    from gsva.modeling import positions_from_mask

    embeds = model.embed(batch.input_ids, model.encode_clip(batch.clip_pixels))
    _, logits, _ = model.language(embeds, batch.attention_mask, positions_from_mask(batch.attention_mask))
    return logits


def text_loss(model, batch: TextBatch) -> LossParts:
    """Next-token CE of the answers (mask parts 0: no mask is predicted)."""
    ce = ce_loss(answer_logits(model, batch), batch.labels)
    zero = ce.new_zeros(())
    return LossParts(total=ce, ce=ce, bce=zero, dice=zero, num_masks=0)


def answer_accuracy(model, batch: TextBatch) -> tuple[int, int]:
    """(correct, total) argmax next-token predictions over the labelled answer tokens (teacher-forced)."""
    predicted, labels = answer_logits(model, batch)[:, :-1].argmax(-1), batch.labels[:, 1:]
    labelled = labels != IGNORE_INDEX
    return int((predicted[labelled] == labels[labelled]).sum()), int(labelled.sum())
