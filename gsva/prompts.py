"""GSVA's conversation: the llava_v1 template, question/answer templates, encoding with labels and slots.

Prompt (facts): ``{system} USER: <im_start><image><im_end>\\n{question} ASSISTANT: {answer}</s>``.
Labels: everything up to and including "ASSISTANT: " is -100; the answer text, its [SEG]/[REJ] tokens and
``</s>`` are trained. The answer's first token may carry the separating space ("ĠSure"), so a token is
trained when it covers any answer character (char offsets from the tokenizer), never by counting tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gsva.config import GSVAConfig
from gsva.tokens import BOS, EOS, UNK, TokenIds, Tokenizer

IGNORE_INDEX = -100
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"

# Training questions (GSVA SHORT_QUESTION_LIST_MODE4) and answers (start, per-expression part); end ".".
QUESTION_TEMPLATES = (
    "Can you segment {names} in this image?",
    "Please segment {names} in this image.",
    "What are {names} in this image? Please respond with segmentation masks.",
    "What are {names} in this image? Please output segmentation masks.",
)
ANSWER_TEMPLATES = (
    ("The segmentation results are", "{name} [SEG]"),
    ("Sure, they are", "{name}:[SEG]"),
    ("Sure,", "the mask of {name} is [SEG]"),
    ("Sure,", "the segmentation of {name} is [SEG]"),
    ("Sure,", "the referred {name} is [SEG]"),
)
ANSWER_END = "."
# Evaluation / annotation conversation: all (up to K) expressions of an image in one question.
EVAL_QUESTION = QUESTION_TEMPLATES[3]
EVAL_ANSWER = ("Sure,", "{name}:[SEG]")


def clean_expression(text: str, cfg: GSVAConfig) -> str:
    """As GSVA: strip, drop trailing '.', lower-case. Reserved token strings are removed so user text can
    never inject a [SEG]/[REJ]/</s> token into the conversation."""
    t = cfg.tokens
    out = text.strip().strip(".").lower()
    for reserved in (t.seg, t.rej, t.im_start, t.im_end, t.image, UNK, BOS, EOS):
        out = out.replace(reserved.lower(), " ")
    return " ".join(out.split())


def image_header(cfg: GSVAConfig) -> str:
    t = cfg.tokens
    return f"{t.im_start}{t.image}{t.im_end}\n"


def question_text(names: list[str], template: str = EVAL_QUESTION) -> str:
    return template.format(names=", ".join(names))


def answer_text(names: list[str], rejected: list[bool], cfg: GSVAConfig,
                template: tuple[str, str] = EVAL_ANSWER) -> str:
    """e.g. "Sure, a:[SEG], b:[REJ]." - one slot per expression, [REJ] for no-target ones."""
    start, part = template
    parts = [part.format(name=n).replace(cfg.tokens.seg, cfg.tokens.rej if r else cfg.tokens.seg)
             for n, r in zip(names, rejected)]
    return f"{start} {', '.join(parts)}{ANSWER_END}"


def conversation(question: str, answer: str | None, cfg: GSVAConfig) -> tuple[str, str]:
    """(prompt up to and including "ASSISTANT: ", answer + "</s>"); answer None -> generation prompt."""
    head = f"{SYSTEM} {USER}: {image_header(cfg)}{question} {ASSISTANT}:"
    if answer is None:
        return head, ""
    return head + " ", answer + EOS


def training_conversation(names: list[str], rejected: list[bool], cfg: GSVAConfig,
                          rng: random.Random) -> tuple[str, str]:
    """A random GSVA training question/answer pair for the expressions of one image."""
    question = question_text(names, rng.choice(QUESTION_TEMPLATES))
    return question, answer_text(names, rejected, cfg, rng.choice(ANSWER_TEMPLATES))


@dataclass
class Encoded:
    """One tokenised conversation. ``slots``: positions of [SEG]/[REJ] tokens in ``ids``;
    ``answer_start``: position of the first answer token (len(ids) when there is no answer)."""

    ids: list[int]
    labels: list[int]
    slots: list[int]
    answer_start: int


def encode(tok: Tokenizer, ids: TokenIds, prompt: str, answer: str, num_image_tokens: int) -> Encoded:
    """Tokenise prompt+answer, expand the single <image> token to the vision tower's token count,
    label only answer tokens, and locate the slots by id."""
    token_ids, offsets = tok.encode(prompt + answer)
    answer_start = len(prompt)
    if token_ids.count(ids.image) != 1:
        raise ValueError(f"expected exactly one image token in the prompt, found {token_ids.count(ids.image)}")
    out_ids: list[int] = []
    labels: list[int] = []
    for tid, (_, end) in zip(token_ids, offsets):
        if tid == ids.image:
            out_ids.extend([tid] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            continue
        out_ids.append(tid)
        labels.append(tid if answer and end > answer_start else IGNORE_INDEX)
    slots = [i for i, t in enumerate(out_ids) if t in (ids.seg, ids.rej)]
    answer_start = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(out_ids))
    return Encoded(out_ids, labels, slots, answer_start)


@dataclass
class Batch:
    """Left-padded token tensors (B, T); ``labels`` -100 on padding and prompt."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Left padding, so every row's last real token is at column -1 (generation reads it there)."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.ids)
        ids[row, width - n:] = torch.tensor(e.ids)
        mask[row, width - n:] = 1
        labels[row, width - n:] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)
