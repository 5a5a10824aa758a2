"""The three ways an answer is obtained from the LLM, on already-tokenised conversations (tensors only).

- ``teacher_forced``: one forward over the given answer; the decision at each slot is the argmax of the
  logits predicting it (official GRES evaluation).
- ``forced_slots``: the answer text is known except the slot tokens; the model chooses only [SEG] or
  [REJ] at each slot, with KV cache and its earlier choices in context ("Sure, a:" forced).
- ``free_greedy``: plain greedy generation with KV cache until </s>.
Every function batches B conversations with left padding and returns, per conversation, the chosen
slot tokens, their probabilities and the hidden state that predicted each one (the [SEG] mask prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gsva.modeling import GSVA, positions_from_mask
from gsva.prompts import Encoded, collate


@dataclass
class SlotChoice:
    """One generated or read slot: ``token`` id, its probability, the hidden state that predicted it."""

    token: int
    prob: float
    hidden: torch.Tensor  # (H,)


@dataclass
class Decoded:
    """Per conversation: the answer token ids (after the prompt) and the slots in answer order."""

    answer_ids: list[int]
    slots: list[SlotChoice] = field(default_factory=list)
    slot_texts: list[list[int]] = field(default_factory=list)  # free generation: ids before each slot


def _new_cache(model: GSVA):
    from transformers import DynamicCache

    return DynamicCache(config=model.language_model.config)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, device=device)
            mask[i, width - len(r):] = 1
    return ids, mask


def teacher_forced(model: GSVA, convs: list[Encoded], image_tokens: torch.Tensor) -> tuple[list[Decoded], torch.Tensor]:
    """One forward over prompt + given answer. Slot decisions = argmax of the logits before each slot.
    Returns the decoded slots and the (B, T, H) hidden states (for the caller's mask prompts)."""
    batch = collate(convs, model.token_ids.pad)
    ids, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device)
    embeds = model.embed(ids, image_tokens)
    hidden, logits, _ = model.language(embeds, mask, positions_from_mask(mask))
    out = []
    for row, conv in enumerate(convs):
        shift = ids.shape[1] - len(conv.ids)  # left padding
        probs = logits[row].float().softmax(-1)
        slots = []
        for s in conv.slots:
            pos = shift + s - 1
            token = int(probs[pos].argmax())
            slots.append(SlotChoice(token, float(probs[pos, token]), hidden[row, pos]))
        out.append(Decoded(answer_ids=[], slots=slots))
    return out, hidden


def forced_slots(model: GSVA, convs: list[Encoded], image_tokens: torch.Tensor) -> list[Decoded]:
    """Feed the known text, let the model choose [SEG] or [REJ] at each slot (argmax of the two),
    chunk by chunk with a KV cache. ``convs`` hold the answer with a placeholder at every slot."""
    ids_t = model.token_ids
    device = model.device
    prefixes = [c.ids[: c.slots[0]] if c.slots else c.ids for c in convs]
    # text between consecutive slots (excluding both slot tokens)
    gaps = [[c.ids[a + 1 : b] for a, b in zip(c.slots, c.slots[1:])] for c in convs]
    decoded = [Decoded(answer_ids=[]) for _ in convs]
    cache = _new_cache(model)
    ids, step_mask = _left_pad(prefixes, ids_t.pad, device)
    embeds = model.embed(ids, image_tokens)
    full_mask = step_mask
    hidden, logits, cache = model.language(embeds, full_mask, positions_from_mask(full_mask), cache, True)
    for step in range(max(len(c.slots) for c in convs)):
        chunks = []
        for b, conv in enumerate(convs):
            if step >= len(conv.slots):
                chunks.append([])
                continue
            probs = logits[b, -1].float().softmax(-1)
            token = ids_t.seg if probs[ids_t.seg] >= probs[ids_t.rej] else ids_t.rej
            decoded[b].slots.append(SlotChoice(token, float(probs[token]), hidden[b, -1]))
            chunks.append([token] + gaps[b][step] if step < len(gaps[b]) else [])
        if not any(chunks):
            break
        ids, step_mask = _left_pad(chunks, ids_t.pad, device)
        past = full_mask.sum(-1)
        full_mask = torch.cat([full_mask, step_mask], dim=1)
        pos = positions_from_mask(step_mask, past)
        hidden, logits, cache = _step(model, ids, full_mask, pos, cache)
    for b, conv in enumerate(convs):
        answer = list(conv.ids[conv.answer_start:])
        for k, s in enumerate(conv.slots):
            answer[s - conv.answer_start] = decoded[b].slots[k].token
        decoded[b].answer_ids = answer
    return decoded


def _step(model: GSVA, ids: torch.Tensor, full_mask: torch.Tensor, pos: torch.Tensor, cache):
    """One cached LLM step over text-only ids (no image placeholders after the prompt)."""
    embeds = model.language_model.embed_tokens(ids)
    return model.language(embeds, full_mask, pos, cache, True)


def free_greedy(model: GSVA, prompts: list[list[int]], image_tokens: torch.Tensor, max_new_tokens: int,
                banned: list[int]) -> list[Decoded]:
    """Greedy generation with KV cache until </s> (or ``max_new_tokens``); ``banned`` ids never chosen.
    Records every generated [SEG]/[REJ] with the hidden state that predicted it."""
    ids_t = model.token_ids
    device = model.device
    ids, mask = _left_pad(prompts, ids_t.pad, device)
    hidden, logits, cache = model.language(model.embed(ids, image_tokens), mask, positions_from_mask(mask),
                                           _new_cache(model), True)
    decoded = [Decoded(answer_ids=[]) for _ in prompts]
    pending: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()
        last[:, banned] = float("-inf")
        probs = last.softmax(-1)
        nxt = probs.argmax(-1)
        for b in range(len(prompts)):
            if done[b]:
                continue
            token = int(nxt[b])
            if token == ids_t.eos:
                done[b] = True
                continue
            decoded[b].answer_ids.append(token)
            if token in (ids_t.seg, ids_t.rej):
                decoded[b].slots.append(SlotChoice(token, float(probs[b, token]), hidden[b, -1]))
                decoded[b].slot_texts.append(pending[b])
                pending[b] = []
            else:
                pending[b].append(token)
        if bool(done.all()):
            break
        step_mask = (~done).long()[:, None]
        past = mask.sum(-1)
        mask = torch.cat([mask, step_mask], dim=1)
        nxt = torch.where(done, torch.full_like(nxt, ids_t.pad), nxt)
        hidden, logits, cache = _step(model, nxt[:, None], mask, positions_from_mask(step_mask, past), cache)
    return decoded
