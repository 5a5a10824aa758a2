"""Tokenizers and GSVA's task tokens, with ids always looked up (never assumed from offsets).

GSVA adds to the Llama vocabulary, in this order: ``[SEG]``, ``[REJ]`` (normal tokens), then
``<im_start>``, ``<im_end>`` (special); transformers' Llava also needs a real ``<image>`` token, added
last. So the last five ids of every GSVA vocabulary are these tokens (``token_ids``); any tokenizer paired
with a model is checked against that layout (``check_tokenizer``) with a clear error.

Pitfall (LISA issue #55): a Llama sentencepiece tokenizer may encode the text "[SEG]" as
[29871, 32000] (a lone "▁" first), so ``tokenizer("[SEG]").input_ids[0]`` is the wrong id. Here ids come
from the vocabulary (``token_to_id``) and slots are found by id in encoded sequences.

Two implementations of one interface (``Tokenizer``): real LLaVA weights use LLaVA's own sentencepiece model
through ``gsva.llama_tokenizer`` (the official SLOW tokenizer path, ids identical to the official code's);
tiny presets use a byte-level BPE tokenizer trained offline on a small built-in corpus (deterministic, no hub
access), saved with the checkpoint as ``tokenizer.json``. Both go through the same prompt encoding
(gsva.prompts.encode, the official ``tokenizer_image_token`` algorithm).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from gsva.config import GSVAConfig
from gsva.llama_tokenizer import SPM_FILE, LlamaSentencePiece

TOKENIZER_FILE = "tokenizer.json"
# Llama's first three ids; our BPE tokenizer reproduces them so HF configs can rely on them.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
NUM_ADDED = 5  # [SEG], [REJ], <im_start>, <im_end>, <image>


@dataclass(frozen=True)
class TokenIds:
    seg: int
    rej: int
    im_start: int
    im_end: int
    image: int
    unk: int = 0
    bos: int = 1
    eos: int = 2

    @property
    def pad(self) -> int:
        """LLaVA v1 pads with <unk>."""
        return self.unk


def token_ids(cfg: GSVAConfig) -> TokenIds:
    """Canonical ids of the task tokens for a vocabulary of cfg.llm.vocab_size rows."""
    base = cfg.llm.vocab_size - NUM_ADDED
    return TokenIds(seg=base, rej=base + 1, im_start=base + 2, im_end=base + 3, image=base + 4)


class Tokenizer(Protocol):
    """What the model side needs from a tokenizer: encode with char offsets, decode, safe id lookup."""

    def __len__(self) -> int: ...

    def token_id(self, token: str) -> int: ...

    def encode(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def add_token(self, token: str, special: bool) -> None: ...

    def save(self, directory: str) -> None: ...


class BPETokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` (the tiny presets' built-in BPE)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary token, or a clear error (never the id of a sub-piece)."""
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary (size {len(self)}); "
                           "was the tokenizer saved without GSVA's added tokens?")
        return tid

    def encode(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and (start, end) character offsets; BOS first when ``add_bos``."""
        enc = self.backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        if add_bos:
            ids, offsets = [self.token_id(BOS)] + ids, [(0, 0)] + offsets
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens (</s>, <image>, ...) dropped, [SEG]/[REJ] kept."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def add_token(self, token: str, special: bool) -> None:
        added = AddedToken(token, special=special, normalized=False)
        (self.backend.add_special_tokens if special else self.backend.add_tokens)([added])

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, TOKENIZER_FILE))

    @classmethod
    def from_file(cls, path: str) -> BPETokenizer:
        return cls(Backend.from_file(path))

    def to_json(self) -> str:
        return self.backend.to_str()


def add_gsva_tokens(tok: Tokenizer, cfg: GSVAConfig) -> Tokenizer:
    """Add GSVA's tokens in the official order (then <image>) to a base (Llama) tokenizer."""
    t = cfg.tokens
    for token, special in ((t.seg, False), (t.rej, False), (t.im_start, True), (t.im_end, True), (t.image, True)):
        try:
            tok.token_id(token)
        except KeyError:
            tok.add_token(token, special)
    return tok


def check_tokenizer(tok: Tokenizer, cfg: GSVAConfig) -> TokenIds:
    """Verify the tokenizer matches the model's vocabulary layout; return the ids."""
    if len(tok) != cfg.llm.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocabulary has "
                         f"{cfg.llm.vocab_size} rows (config {cfg.name!r})")
    ids = token_ids(cfg)
    t = cfg.tokens
    found = {name: tok.token_id(text) for name, text in
             (("seg", t.seg), ("rej", t.rej), ("im_start", t.im_start), ("im_end", t.im_end), ("image", t.image),
              ("unk", UNK), ("bos", BOS), ("eos", EOS))}
    wrong = {k: (v, getattr(ids, k)) for k, v in found.items() if v != getattr(ids, k)}
    if wrong:
        raise ValueError("tokenizer ids differ from the model's layout (found, expected): "
                         + ", ".join(f"{k}={v}" for k, v in wrong.items()))
    return ids


# --------------------------------------------------------------------------------- built-in tiny tokenizer
# A small English corpus for the byte-level BPE merges: the conversation text, GSVA's templates and
# common referring-expression words. Any text still encodes (byte fallback), only less compactly.
_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT:
Can you segment in this image? Please segment in this image. What are in this image? Please respond with
segmentation masks. Please output segmentation masks. The segmentation results are Sure, they are Sure,
the mask of is the segmentation of is the referred is Sure, a:[SEG], b:[REJ], c:[SEG].
the red circle the green square the blue triangle the yellow circle all red shapes all green shapes all
blue shapes all yellow shapes all circles all squares all triangles the leftmost circle the rightmost
square the leftmost triangle the rightmost circle the red square and the blue triangle
man woman person people child boy girl guy lady player kid baby left right middle center top bottom front
back behind near far closest first second third last two three white black red blue green yellow brown
gray grey orange pink purple dark light shirt jacket hat cap dress pants coat car truck bus bike
motorcycle train boat plane chair table couch bed bench sofa dog cat horse cow sheep elephant zebra
giraffe bear bird pizza cake sandwich donut banana apple orange umbrella bottle cup bowl glass plate
with in on at of the a an and or not no none nothing who which that is are standing sitting holding
wearing looking walking next to under above big small large tall short little long half whole partial
empty other another both all any each every one part side edge corner picture photo background
"""


def build_base_bpe(cfg: GSVAConfig) -> BPETokenizer:
    """The built-in byte-level BPE before GSVA's tokens: <unk>/<s>/</s> at 0/1/2, then bytes and merges,
    cfg.llm.vocab_size - 5 tokens (deterministic: same corpus, same merges). Plays "the Llama tokenizer"."""
    backend = Backend(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.llm.vocab_size - NUM_ADDED, min_frequency=1, show_progress=False,
                                  special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = " ".join(_CORPUS.split())
    backend.train_from_iterator([words] * 2 + words.split(". "), trainer=trainer)
    return BPETokenizer(backend)


def build_builtin_tokenizer(cfg: GSVAConfig) -> Tokenizer:
    """The tiny presets' tokenizer: build_base_bpe + GSVA's tokens, exactly cfg.llm.vocab_size tokens."""
    tok = add_gsva_tokens(build_base_bpe(cfg), cfg)
    if len(tok) != cfg.llm.vocab_size:
        raise ValueError(f"built-in tokenizer reached {len(tok)} tokens, the config wants {cfg.llm.vocab_size}: "
                         "lower llm.vocab_size for this preset")
    check_tokenizer(tok, cfg)
    return tok


def load_pretrained_tokenizer(directory: str) -> Tokenizer:
    """A base Llama tokenizer from a LLaVA model folder: its sentencepiece ``tokenizer.model`` through the
    official slow path (gsva.llama_tokenizer); a folder with only a ``tokenizer.json`` (our tiny fixtures)
    through the BPE wrapper. A fast ``tokenizer.json`` is never used for a Llama vocabulary: its ids differ
    from the official ones around [SEG]/[REJ] (LISA #55)."""
    if os.path.exists(os.path.join(directory, SPM_FILE)):
        return LlamaSentencePiece.from_pretrained(directory)
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.exists(path):
        return BPETokenizer.from_file(path)
    raise FileNotFoundError(f"{directory} has neither {SPM_FILE} (LLaVA's sentencepiece model) nor {TOKENIZER_FILE}")


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer saved in one of our checkpoint folders (``Tokenizer.save``), GSVA's tokens included."""
    if os.path.exists(os.path.join(directory, SPM_FILE)):
        return LlamaSentencePiece.from_saved(directory)
    return BPETokenizer.from_file(os.path.join(directory, TOKENIZER_FILE))

