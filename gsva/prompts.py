"""GSVA's conversations, byte for byte as the official code builds them, and their encoding with labels and slots.

Templates (``GSVAConfig.conversation``): ``llava_v1`` (the official default, used by every official script,
7B and 13B) ``{system} USER: {user} ASSISTANT: {answer}</s>``, and ``llava_llama_2`` (the ``[INST]`` template)
``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``. ``<image>`` in the user message
becomes ``<im_start><image><im_end>``. A generation prompt stops at ``ASSISTANT:`` / ``[/INST]``.

Evaluation and annotation (official ``ValDataset``): every expression of the image in one conversation,
each ``.strip().lower()`` then ``.strip().strip('.')``; user ``"<image>\\n What are " + ", ".join(names) +
"in this image? Please output segmentation masks."`` (a space before "What", none before "in"); answer
``"Sure," + ", ".join(f"{name}:[SEG]" or f"{name}:[REJ]") + "."``. Training (official ``ReferSegDataset``):
texts ``.strip()`` then ``.strip('.')``; one of four questions with the names joined and lower-cased; answer
``start + " " + ", ".join(parts) + "."`` with one of five (start, part) pairs, names in their own case.

One deliberate addition: user text can never inject a model token. Every reserved token string (``[SEG]``,
``[REJ]``, ``<im_start>``, ``<im_end>``, ``<image>``, ``<unk>``, ``<s>``, ``</s>``) is deleted from an expression
before the official cleaning; text without one (all ordinary text) is left byte for byte as officially.

Labels (official ``collate_fn``): everything up to and including the prompt's last character is -100, the
answer and ``</s>`` are trained. The answer's first token carries the separating space ("▁Sure"), so a token
is trained when it covers any answer character (character offsets), never by counting tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gsva.config import GSVAConfig
from gsva.tokens import BOS, EOS, UNK, TokenIds, Tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    """One official conversation template: ``prompt`` ends where the answer starts."""

    name: str
    system: str
    before_user: str  # text between the system string and the user message
    before_answer: str  # text between the user message and the answer (the generation prompt ends here)
    answer_end: str  # after the answer

    def head(self, user: str) -> str:
        return f"{self.before_user.format(system=self.system)}{user}{self.before_answer}"


LLAVA_V1 = Template(
    name="llava_v1",
    system="A chat between a curious human and an artificial intelligence assistant. The assistant gives "
           "helpful, detailed, and polite answers to the human's questions.",
    before_user="{system} USER: ", before_answer=" ASSISTANT:", answer_end=EOS)
LLAVA_LLAMA_2 = Template(
    name="llava_llama_2",
    system="You are a helpful language and vision assistant. You are able to understand the visual content "
           "that the user provides, and assist the user with a variety of tasks using natural language.",
    before_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n", before_answer=" [/INST]", answer_end=" " + EOS)
TEMPLATES = {t.name: t for t in (LLAVA_V1, LLAVA_LLAMA_2)}

# Training questions (SHORT_QUESTION_LIST_MODE4) and answers (ANSWER_LIST_MODE4_START / _TEMPLATE, end ".").
TRAIN_QUESTIONS = (
    "\nCan you segment {class_name} in this image?",
    "\nPlease segment {class_name} in this image.",
    "\nWhat are {class_name} in this image? Please respond with segmentation masks.",
    "\nWhat are {class_name} in this image? Please output segmentation masks.",
)
TRAIN_ANSWERS = (
    ("The segmentation results are", "{class_name} [SEG]"),
    ("Sure, they are", "{class_name}:[SEG]"),
    ("Sure,", "the mask of {class_name} is [SEG]"),
    ("Sure,", "the segmentation of {class_name} is [SEG]"),
    ("Sure,", "the referred {class_name} is [SEG]"),
)
ANSWER_END = "."
# Evaluation / annotation (ValDataset): the one question and answer form the released weights were scored on.
EVAL_QUESTION = ("\n What are ", "in this image? Please output segmentation masks.")
EVAL_ANSWER_START = "Sure,"


def reserved_tokens(cfg: GSVAConfig) -> tuple[str, ...]:
    t = cfg.tokens
    return (t.seg, t.rej, t.im_start, t.im_end, t.image, UNK, BOS, EOS)


def drop_reserved(text: str, cfg: GSVAConfig) -> str:
    """``text`` without any reserved token string (repeated: deleting one must not leave another)."""
    reserved = reserved_tokens(cfg)
    while any(r in text for r in reserved):
        for r in reserved:
            text = text.replace(r, "")
    return text


def eval_names(texts: list[str], cfg: GSVAConfig) -> list[str]:
    """Expressions as the official evaluation cleans them: ``.strip().lower()``, then ``.strip().strip('.')``."""
    return [drop_reserved(t.strip().lower(), cfg).strip().strip(".") for t in texts]


def train_names(texts: list[str], cfg: GSVAConfig) -> list[str]:
    """Expressions as the official training cleans them: ``.strip()``, then ``.strip('.')`` (case kept)."""
    return [drop_reserved(t.strip(), cfg).strip(".") for t in texts]


def eval_question(names: list[str], cfg: GSVAConfig) -> str:
    """The user message of the official evaluation (note " What" and "shapesin")."""
    start, end = EVAL_QUESTION
    return f"{cfg.tokens.image}{start}{', '.join(names)}{end}"


def slot(part: str, rejected: bool, cfg: GSVAConfig) -> str:
    return part.replace(cfg.tokens.seg, cfg.tokens.rej) if rejected else part


def eval_answer(names: list[str], rejected: list[bool], cfg: GSVAConfig) -> str:
    """e.g. "Sure,a:[SEG], b:[REJ]." - one slot per expression, [REJ] for no-target ones."""
    parts = [slot(f"{n}:{cfg.tokens.seg}", r, cfg) for n, r in zip(names, rejected)]
    return f"{EVAL_ANSWER_START}{', '.join(parts)}{ANSWER_END}"


def train_question(names: list[str], choice: int, cfg: GSVAConfig) -> str:
    return cfg.tokens.image + TRAIN_QUESTIONS[choice].format(class_name=", ".join(names).lower())


def train_answer(names: list[str], rejected: list[bool], choice: int, cfg: GSVAConfig) -> str:
    """``start + " " + ", ".join(parts) + "."``; a no-target part's [SEG] is [REJ]. (Officially the part's
    text "SEG" is replaced, which also hits an expression containing "SEG"; here only the slot changes.)"""
    start, part = TRAIN_ANSWERS[choice]
    parts = [slot(part.format(class_name=n), r, cfg) for n, r in zip(names, rejected)]
    return f"{start} {', '.join(parts)}{ANSWER_END}"


def training_conversation(texts: list[str], rejected: list[bool], cfg: GSVAConfig,
                          rng: random.Random) -> tuple[str, str]:
    """A random official training (user message, answer) for the expressions of one image."""
    names = train_names(texts, cfg)
    question = train_question(names, rng.randrange(len(TRAIN_QUESTIONS)), cfg)
    return question, train_answer(names, rejected, rng.randrange(len(TRAIN_ANSWERS)), cfg)


def conversation(user: str, answer: str | None, cfg: GSVAConfig) -> tuple[str, str]:
    """(prompt, answer + end) of ``cfg.conversation``; ``answer`` None -> the generation prompt and ""."""
    t = cfg.tokens
    template = TEMPLATES[cfg.conversation]
    head = template.head(user.replace(t.image, f"{t.im_start}{t.image}{t.im_end}"))
    if answer is None:
        return head, ""
    return head + " ", answer + template.answer_end


@dataclass
class Encoded:
    """One tokenised conversation. ``slots``: positions of [SEG]/[REJ] tokens in ``ids``;
    ``answer_start``: position of the first answer token (len(ids) when there is no answer)."""

    ids: list[int]
    labels: list[int]
    slots: list[int]
    answer_start: int


def encode(tok: Tokenizer, ids: TokenIds, prompt: str, answer: str, cfg: GSVAConfig) -> Encoded:
    """Tokenise as the official ``tokenizer_image_token``: the text split on ``<image>``, each chunk encoded
    on its own (BOS on the first chunk only), chunks joined by the image placeholder, expanded to the vision
    tower's token count; label only answer tokens and locate the slots by id."""
    image_token, num_image_tokens = cfg.tokens.image, cfg.vision.num_image_tokens
    text = prompt + answer
    chunks = text.split(image_token)
    if len(chunks) != 2:
        raise ValueError(f"expected exactly one {image_token} in the prompt, found {len(chunks) - 1}")
    answer_start = len(prompt)
    out_ids: list[int] = []
    labels: list[int] = []
    start = 0
    for n, chunk in enumerate(chunks):
        if n:
            out_ids.extend([ids.image] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            start += len(image_token)
        token_ids, offsets = tok.encode(chunk, add_bos=n == 0)
        for tid, (_, end) in zip(token_ids, offsets):
            out_ids.append(tid)
            labels.append(tid if answer and start + end > answer_start else IGNORE_INDEX)
        start += len(chunk)
    slots = [i for i, t in enumerate(out_ids) if t in (ids.seg, ids.rej)]
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(out_ids))
    return Encoded(out_ids, labels, slots, first)


def encode_eval(tok: Tokenizer, ids: TokenIds, names: list[str], rejected: list[bool] | None,
                cfg: GSVAConfig) -> Encoded:
    """The official evaluation conversation of cleaned ``names`` (``eval_names``), encoded; ``rejected`` None
    -> the generation prompt (no answer)."""
    question = eval_question(names, cfg)
    answer = None if rejected is None else eval_answer(names, rejected, cfg)
    prompt, full_answer = conversation(question, answer, cfg)
    return encode(tok, ids, prompt, full_answer, cfg)


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
