"""The official GSVA tokenizer path for real weights: LLaVA's sentencepiece model, tokenised as transformers'
SLOW ``LlamaTokenizer`` does in the official environment (transformers 4.44.2, default ``legacy`` behaviour).

Why not a fast ``tokenizer.json``: with GSVA's added tokens the fast Llama tokenizer gives other ids around
``[SEG]``/``[REJ]`` ("circle:[SEG]" becomes ":[", "SE", "G", ...; LISA #55); tests/test_llama_tokenizer.py shows
it on the real 32k vocabulary. The slow algorithm, reproduced here: the text is split on the added tokens
(leftmost, longest first; ``<unk>``/``<s>``/``</s>`` count as added), each added token is its id, and every
other piece is encoded by sentencepiece on its own, so each piece gets sentencepiece's dummy-prefix "▁" (after
"[SEG]", ", all" is "▁," "▁all"). BOS is prepended by the caller's choice (gsva.prompts.encode puts it on the
first ``<image>`` chunk only, as ``tokenizer_image_token``).

Saved as ``tokenizer.model`` (the sentencepiece model, unchanged) plus ``added_tokens.json`` (GSVA's tokens in
id order, from 32000).
"""

from __future__ import annotations

import json
import os
import re

import sentencepiece as spm

SPM_FILE = "tokenizer.model"
ADDED_FILE = "added_tokens.json"
CONFIG_FILE = "tokenizer_config.json"
CONTROL = ("<unk>", "<s>", "</s>")


class LlamaSentencePiece:
    """Sentencepiece model + added tokens with the slow tokenizer's splitting (see the module docstring)."""

    def __init__(self, model_proto: bytes, added: list[tuple[str, bool]] = ()):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.base = self.sp.get_piece_size()
        self.added: dict[str, int] = {}
        self.special: set[str] = set(CONTROL)
        self._index()
        for token, special in added:
            self.add_token(token, special)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory: str) -> LlamaSentencePiece:
        """LLaVA's base tokenizer from its model folder (``tokenizer.model``); refuses ``legacy: false``,
        which the official environment never runs (its LLaVA configs leave the legacy default)."""
        config = os.path.join(directory, CONFIG_FILE)
        if os.path.exists(config):
            with open(config) as f:
                legacy = json.load(f).get("legacy")
            if legacy is False:
                raise ValueError(f"{config} sets legacy=false; the official GSVA tokenisation is the legacy slow "
                                 "Llama tokenizer (the LLaVA checkpoints' default): remove that key")
        with open(os.path.join(directory, SPM_FILE), "rb") as f:
            return cls(f.read())

    @classmethod
    def from_saved(cls, directory: str) -> LlamaSentencePiece:
        with open(os.path.join(directory, SPM_FILE), "rb") as f:
            model = f.read()
        with open(os.path.join(directory, ADDED_FILE)) as f:
            added = [(t["content"], t["special"]) for t in json.load(f)]
        return cls(model, added)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SPM_FILE), "wb") as f:
            f.write(self.model_proto)
        order = sorted(self.added, key=self.added.get)
        with open(os.path.join(directory, ADDED_FILE), "w") as f:
            json.dump([{"content": t, "id": self.added[t], "special": t in self.special} for t in order], f, indent=1)

    # ------------------------------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        return self.base + len(self.added)

    def add_token(self, token: str, special: bool) -> None:
        """Append ``token`` (transformers' ``add_tokens``: the next id); ``special`` ones vanish in decode."""
        if token in self.added or self._piece_id(token) is not None:
            return
        self.added[token] = len(self)
        if special:
            self.special.add(token)
        self._index()

    def _index(self) -> None:
        """The splitter: leftmost, longest added token first, as transformers' added-token trie."""
        names = sorted({*self.added, *CONTROL}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def _piece_id(self, token: str) -> int | None:
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token else None

    def token_id(self, token: str) -> int:
        """The id of one vocabulary token, or a clear error (never the id of a sub-piece)."""
        tid = self.added.get(token, self._piece_id(token))
        if tid is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary (size {len(self)}); "
                           "was the tokenizer saved without GSVA's added tokens?")
        return tid

    # ------------------------------------------------------------------------------------------ text
    def encode(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and (start, end) character offsets; BOS first when ``add_bos``."""
        ids: list[int] = [self.sp.bos_id()] if add_bos else []
        offsets: list[tuple[int, int]] = [(0, 0)] if add_bos else []
        start = 0
        for n, piece in enumerate(self._split.split(text)):
            if n % 2:  # an added (or control) token
                ids.append(self.token_id(piece))
                offsets.append((start, start + len(piece)))
            elif piece:
                for tid, (a, b) in self._encode_piece(piece):
                    ids.append(tid)
                    offsets.append((start + a, start + b))
            start += len(piece)
        return ids, offsets

    def _encode_piece(self, piece: str) -> list[tuple[int, tuple[int, int]]]:
        """sentencepiece ids of one text piece with character offsets (sentencepiece reports bytes)."""
        data = piece.encode("utf-8")
        char_at = [0] * (len(data) + 1)
        pos = 0
        for i, ch in enumerate(piece):
            width = len(ch.encode("utf-8"))
            char_at[pos:pos + width] = [i] * width
            pos += width
        char_at[len(data)] = len(piece)
        proto = self.sp.encode(piece, return_type="proto")
        return [(p.id, (char_at[p.begin], char_at[p.end])) for p in proto.pieces]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens (</s>, <image>, ...) dropped, [SEG]/[REJ] kept."""
        by_id = {v: k for k, v in self.added.items()}
        out, run = [], []
        for tid in ids:
            token = by_id.get(tid) or (self.sp.id_to_piece(tid) if tid < 3 else None)
            if token is None:
                run.append(tid)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if token not in self.special:
                out.append(token)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)
