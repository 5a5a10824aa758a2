"""Start the ``[SEG]`` / ``[REJ]`` rows of a base that never saw them from words it already predicts.

GSVA adds ``[SEG]`` and ``[REJ]`` to a LLaVA that has never produced them, so their ``lm_head`` and
``embed_tokens`` rows start random and the GSVA stage learns the decision from nothing. A base that was
pretrained to answer "where is {phrase}?" with a position, or "none" for an absent phrase, already makes that
decision at the token after ``{phrase}:``, which is where GSVA's answer puts the slot. Setting ``[REJ]``'s rows to
the mean of "none"'s and ``[SEG]``'s to the mean of the position words' hands that decision to the new tokens:
the logit of a mean row is the mean of the words' logits. Each word counts by its first token after a space,
the one a base predicts after ``{phrase}:``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gsva.tokens import Tokenizer


def first_token(tok: Tokenizer, word: str) -> int:
    """The id a model predicts first for ``word`` after a space, e.g. "none" in "p: none"."""
    ids, _ = tok.encode(f" {word.strip()}", add_bos=False)
    if not word.strip() or not ids:
        raise ValueError(f"{word!r} is not a word the tokenizer encodes")
    return ids[0]


@torch.no_grad()
def init_rows_from_words(mllm: nn.Module, tok: Tokenizer, token_id: int, words: Sequence[str]) -> list[int]:
    """Set row ``token_id`` of ``mllm``'s (``GSVA.mllm``, the transformers LLaVA) input embeddings and
    ``lm_head`` to the mean of ``words``' first-token rows; -> those source ids. The two matrices are untied in
    GSVA (each is set; a tied one once)."""
    if not words:
        raise ValueError("no words to start the row from")
    sources = sorted({first_token(tok, w) for w in words})
    if token_id in sources:
        raise ValueError(f"token {token_id} cannot start from itself")
    matrices = {id(m): m for m in (mllm.get_input_embeddings().weight, mllm.get_output_embeddings().weight)}
    for weight in matrices.values():
        weight[token_id] = weight[sources].float().mean(0).to(weight.dtype)
    return sources
