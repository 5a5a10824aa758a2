"""GSVAPredictor: images + expressions in, one decision and one original-size mask per expression out.

Each image's expressions are asked in conversations of at most K (``max_expressions_per_prompt``; the
GSVA protocol is all of them in one conversation, which K >= the image's expression count gives), all
conversations of a call batched with left padding; each image's CLIP tokens and SAM embedding are computed
once and shared by its conversations. Modes:

Every mode uses the official evaluation conversation (gsva.prompts: "<image>\n What are a, bin this image?
Please output segmentation masks." / "Sure,a:[SEG], b:[REJ].") and binarises masks at logit >= 0 (GSVA's
``solver.py``).

- ``mode="generate"`` (annotation, no ground truth), ``decoding="forced"`` (default): the answer text
  "Sure,a:[SEG], b:[SEG]." is forced and the model chooses only each slot ([SEG] or [REJ]) with its
  earlier choices in context (KV cache): exact to parse. ``decoding="free"``: greedy generation until
  </s>; generated slots are matched to expressions by phrase (gsva.answers), mismatches reported in
  ``note``, unanswered expressions get decision "none" (treated as rejected).
- ``mode="teacher-forced"`` (official GRES protocol): one forward over the ground-truth answer; decision
  = argmax at each slot (neither token counts as the opposite of the ground truth, as officially); then
  every [REJ] becomes [SEG] and the LLM runs again, giving every expression ``forced_mask``; ``mask`` is
  that mask unless rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gsva import prompts
from gsva.answers import match_slots
from gsva.checkpoint import load_model
from gsva.config import GENERATE, MODES, TEACHER_FORCED
from gsva.decoding import Decoded, SlotChoice, forced_slots, free_greedy, teacher_forced
from gsva.modeling import GSVA
from gsva.tokens import Tokenizer, check_tokenizer
from gsva.transforms import masks_to_original, prepare_images

DECODINGS = ("forced", "free")
MASK_THRESHOLD = 0.0  # binarise logits at >= 0, as the official GRES evaluation (solver.py)


@dataclass
class ExpressionResult:
    decision: str  # "seg" | "rej" | "none" (neither token found: treated as rejected, flagged)
    rejected: bool
    mask: np.ndarray  # bool (H, W) at original size; all False when rejected
    forced_mask: np.ndarray | None  # teacher-forced: mask of the REJ->SEG re-run (every expression)
    score: float  # probability of the decision token
    answer: str  # the conversation's answer text
    note: str | None = None


@dataclass
class _Conv:
    image: int  # index into the call's images
    exprs: list[int]  # indices into that image's expressions
    names: list[str]


class GSVAPredictor:
    def __init__(self, model: GSVA, tokenizer: Tokenizer, model_id: str):
        check_tokenizer(tokenizer, model.cfg)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.cfg = model.cfg

    @classmethod
    def from_checkpoint(cls, uri_or_preset: str, device: str = "cpu", storage=None,
                        dtype: torch.dtype | None = None) -> GSVAPredictor:
        """A preset name (random init, built-in tokenizer) or a checkpoint URI (gsva.checkpoint format)."""
        model, tokenizer, model_id = load_model(uri_or_preset, storage=storage, device=device, dtype=dtype)
        return cls(model, tokenizer, model_id)

    # ------------------------------------------------------------------------------------------------ API
    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], expressions: list[list[str]], mode: str = GENERATE,
                no_target: list[list[bool]] | None = None, max_expressions_per_prompt: int | None = None,
                decoding: str = "forced") -> list[list[ExpressionResult]]:
        """``max_expressions_per_prompt`` None: every expression of an image in one conversation (GSVA)."""
        self._check_args(images, expressions, mode, no_target, max_expressions_per_prompt, decoding)
        prepared = prepare_images(images, self.cfg)  # validates every image (ImageError names it)
        convs = [_Conv(i, list(range(s, min(s + k, len(exprs)))), prompts.eval_names(exprs[s:s + k], self.cfg))
                 for i, exprs in enumerate(expressions)
                 for k in [max_expressions_per_prompt or max(1, len(exprs))] for s in range(0, len(exprs), k)]
        results: list[list[ExpressionResult | None]] = [[None] * len(e) for e in expressions]
        if not convs:
            return results  # type: ignore[return-value]
        used = sorted({c.image for c in convs})
        local = {img: n for n, img in enumerate(used)}
        device = self.model.device
        tokens, embeddings = self.model.encode_images(prepared.clip_pixels[used].to(device),
                                                      prepared.sam_pixels[used].to(device))
        conv_tokens = tokens[[local[c.image] for c in convs]]
        if mode == TEACHER_FORCED:
            self._teacher_forced(convs, no_target, conv_tokens, embeddings, local, prepared, results)
        elif decoding == "forced":
            encoded = [self._encode(c, [False] * len(c.names)) for c in convs]
            decoded = forced_slots(self.model, encoded, conv_tokens)
            self._emit(convs, decoded, [list(range(len(c.names))) for c in convs],
                       [{} for _ in convs], embeddings, local, prepared, results)
        else:
            self._free(convs, conv_tokens, embeddings, local, prepared, results)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------- helpers
    def _check_args(self, images, expressions, mode, no_target, k, decoding) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, not {decoding!r}")
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images but {len(expressions)} expression lists")
        if k is not None and k < 1:
            raise ValueError("max_expressions_per_prompt must be >= 1 (or None: all in one conversation)")
        if mode == TEACHER_FORCED:
            if no_target is None:
                raise ValueError("teacher-forced mode needs the ground truth no_target flags")
            for i, (e, n) in enumerate(zip(expressions, no_target, strict=True)):
                if len(e) != len(n):
                    raise ValueError(f"image {i}: {len(e)} expressions but {len(n)} no_target flags")

    def _encode(self, conv: _Conv, rejected: list[bool]) -> prompts.Encoded:
        enc = prompts.encode_eval(self.tokenizer, self.model.token_ids, conv.names, rejected, self.cfg)
        context = self.cfg.llm.max_position_embeddings
        if len(enc.ids) + self.cfg.max_new_tokens_per_expression > context:
            raise ValueError(f"image {conv.image}: a conversation of {len(conv.names)} expressions takes "
                             f"{len(enc.ids)} tokens, too close to the model's context of {context}: "
                             "ask them in smaller groups (max_expressions_per_prompt)")
        if len(enc.slots) != len(conv.names):
            raise ValueError(f"image {conv.image}: {len(enc.slots)} slots for {len(conv.names)} expressions")
        return enc

    def _masks(self, hidden: list[torch.Tensor], images: list[int], embeddings, local, prepared) -> list[np.ndarray]:
        """Binary original-size masks for prompt hidden states of the given call-level images."""
        if not hidden:
            return []
        low = self.model.decode_masks(torch.stack(hidden), embeddings,
                                      torch.tensor([local[i] for i in images], device=self.model.device))
        out = []
        for m, i in zip(low, images):
            logits = masks_to_original(m[None], prepared.resized[i], prepared.original[i], self.cfg.sam.image_size)
            out.append((logits[0] >= MASK_THRESHOLD).cpu().numpy())
        return out

    def _answer(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).strip()

    def _emit(self, convs: list[_Conv], decoded: list[Decoded], slot_to_expr: list[list[int | None]],
              notes: list[dict[int, list[str]]], embeddings, local, prepared, results) -> None:
        """Write generate-mode results: masks for [SEG] slots, empty masks otherwise."""
        seg = self.model.token_ids.seg
        todo = [(c, s, j) for c, (conv, dec) in enumerate(zip(convs, decoded))
                for s, j in zip(dec.slots, slot_to_expr[c]) if j is not None and s.token == seg]
        masks = self._masks([s.hidden for _, s, _ in todo], [convs[c].image for c, _, _ in todo],
                            embeddings, local, prepared)
        mask_of = {(c, j): m for (c, _, j), m in zip(todo, masks)}
        for c, (conv, dec) in enumerate(zip(convs, decoded)):
            answer = self._answer(dec.answer_ids)
            chosen: dict[int, SlotChoice] = {j: s for s, j in zip(dec.slots, slot_to_expr[c]) if j is not None}
            h, w = prepared.original[conv.image]
            for j, e in enumerate(conv.exprs):
                slot = chosen.get(j)
                decision = "none" if slot is None else ("seg" if slot.token == seg else "rej")
                mask = mask_of.get((c, j), np.zeros((h, w), dtype=bool))
                note = "; ".join(notes[c].get(j, [])) or None
                results[conv.image][e] = ExpressionResult(decision, decision != "seg", mask, None,
                                                          slot.prob if slot else 0.0, answer, note)

    def _free(self, convs, conv_tokens, embeddings, local, prepared, results) -> None:
        ids = self.model.token_ids
        prompt_ids = [prompts.encode_eval(self.tokenizer, ids, conv.names, None, self.cfg).ids for conv in convs]
        budget = self.cfg.max_new_tokens_per_expression * max(len(c.names) for c in convs)
        banned = [ids.image, ids.im_start, ids.im_end, ids.bos, ids.unk]
        decoded = free_greedy(self.model, prompt_ids, conv_tokens, budget, banned)
        slot_to_expr, notes = [], []
        for conv, dec in zip(convs, decoded):
            matching = match_slots([self.tokenizer.decode(t) for t in dec.slot_texts], conv.names)
            slot_to_expr.append(matching.slot_to_expr)
            notes.append(matching.notes)
        self._emit(convs, decoded, slot_to_expr, notes, embeddings, local, prepared, results)

    def _teacher_forced(self, convs, no_target, conv_tokens, embeddings, local, prepared, results) -> None:
        ids = self.model.token_ids
        gts = [[bool(no_target[c.image][e]) for e in c.exprs] for c in convs]
        first, _ = teacher_forced(self.model, [self._encode(c, g) for c, g in zip(convs, gts)], conv_tokens)
        all_seg = [self._encode(c, [False] * len(c.names)) for c in convs]
        second, hidden = teacher_forced(self.model, all_seg, conv_tokens)
        forced = self._masks([s.hidden for d in second for s in d.slots],
                             [c.image for c, d in zip(convs, second) for _ in d.slots], embeddings, local, prepared)
        k = 0
        for conv, gt, dec, enc in zip(convs, gts, first, all_seg):
            answer_ids = list(enc.ids[enc.answer_start:])
            for n, s in enumerate(dec.slots):
                answer_ids[enc.slots[n] - enc.answer_start] = s.token
            answer = self._answer(answer_ids)
            for j, e in enumerate(conv.exprs):
                slot, fmask = dec.slots[j], forced[k]
                k += 1
                decision = {ids.seg: "seg", ids.rej: "rej"}.get(slot.token, "none")
                note = None
                rejected = decision == "rej"
                if decision == "none":
                    rejected = not gt[j]  # official: anything else counts as the opposite of the ground truth
                    note = (f"slot argmax was token {slot.token} ({self.tokenizer.decode([slot.token])!r}), "
                            "neither [SEG] nor [REJ]: counted as the opposite of the ground truth")
                mask = np.zeros_like(fmask) if rejected else fmask
                results[conv.image][e] = ExpressionResult(decision, rejected, mask, fmask, slot.prob, answer, note)
