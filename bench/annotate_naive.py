"""The naive LISA-style baseline of benchmark 1, built from GSVA's public pieces (no predictor internals).

One expression per conversation, one image at a time, the CLIP and SAM encoders run again for every
expression, and generation without a KV cache (every new token re-runs the LLM over the whole sequence).
It follows the predictor's decoding rules token for token, so its decisions and masks must equal the
predictor's at one expression per conversation; only the cost differs.
"""

from __future__ import annotations

import numpy as np
import torch

from gsva import prompts
from gsva.answers import match_slots
from gsva.modeling import positions_from_mask
from gsva.predictor import MASK_THRESHOLD, ExpressionResult, GSVAPredictor
from gsva.transforms import masks_to_original, prepare_images


def _full_forward(p: GSVAPredictor, seq: list[int], image_tokens: torch.Tensor):
    """The whole sequence through the LLM, no cache: (hidden (T, H), logits (T, V))."""
    ids = torch.tensor([seq], device=p.model.device)
    mask = torch.ones_like(ids)
    hidden, logits, _ = p.model.language(p.model.embed(ids, image_tokens), mask, positions_from_mask(mask))
    return hidden[0], logits[0]


def _mask(p: GSVAPredictor, hidden: torch.Tensor, embedding: torch.Tensor, prepared) -> np.ndarray:
    low = p.model.decode_masks(hidden[None], embedding, torch.zeros(1, dtype=torch.long, device=p.model.device))
    logits = masks_to_original(low[0][None], prepared.resized[0], prepared.original[0], p.cfg.sam.image_size)
    return (logits[0] > MASK_THRESHOLD).cpu().numpy()


@torch.inference_mode()
def naive_generate(p: GSVAPredictor, image: np.ndarray, expression: str, decoding: str) -> ExpressionResult:
    """One expression, its own conversation and its own image encoding. `decoding`: "free" (greedy until
    </s>) or "forced" (answer text given, the model picks [SEG]/[REJ] at the slot)."""
    cfg, ids = p.cfg, p.model.token_ids
    prepared = prepare_images([image], cfg)
    tokens, embedding = p.model.encode_images(prepared.clip_pixels.to(p.model.device),
                                              prepared.sam_pixels.to(p.model.device))
    names = prompts.eval_names([expression], cfg)
    h, w = prepared.original[0]
    if decoding == "forced":
        enc = prompts.encode_eval(p.tokenizer, ids, names, [False], cfg)
        hidden, logits = _full_forward(p, enc.ids[: enc.slots[0]], tokens)
        probs = logits[-1].float().softmax(-1)
        token = ids.seg if probs[ids.seg] >= probs[ids.rej] else ids.rej
        answer_ids = list(enc.ids[enc.answer_start:])
        answer_ids[enc.slots[0] - enc.answer_start] = token
        seg = token == ids.seg
        mask = _mask(p, hidden[-1], embedding, prepared) if seg else np.zeros((h, w), dtype=bool)
        return ExpressionResult("seg" if seg else "rej", not seg, mask, None, float(probs[token]),
                                p.tokenizer.decode(answer_ids).strip())
    seq = list(prompts.encode_eval(p.tokenizer, ids, names, None, cfg).ids)
    banned = [ids.image, ids.im_start, ids.im_end, ids.bos, ids.unk]
    generated, slots, slot_texts, pending = [], [], [], []
    for _ in range(cfg.max_new_tokens_per_expression):
        hidden, logits = _full_forward(p, seq, tokens)
        last = logits[-1].float()
        last[banned] = float("-inf")
        probs = last.softmax(-1)
        token = int(probs.argmax())
        if token == ids.eos:
            break
        seq.append(token)
        generated.append(token)
        if token in (ids.seg, ids.rej):
            slots.append((token, float(probs[token]), hidden[-1]))
            slot_texts.append(pending)
            pending = []
        else:
            pending.append(token)
    matching = match_slots([p.tokenizer.decode(t) for t in slot_texts], names)
    chosen = {j: s for s, j in zip(slots, matching.slot_to_expr) if j is not None}.get(0)
    decision = "none" if chosen is None else ("seg" if chosen[0] == ids.seg else "rej")
    mask = _mask(p, chosen[2], embedding, prepared) if decision == "seg" else np.zeros((h, w), dtype=bool)
    return ExpressionResult(decision, decision != "seg", mask, None, chosen[1] if chosen else 0.0,
                            p.tokenizer.decode(generated).strip(), "; ".join(matching.notes.get(0, [])) or None)
