"""The official GSVA conversations, byte for byte (LeapLabTHU/GSVA data/dataset.py ValDataset, data/
refer_seg_dataset.py, model/llava/constants.py, model/llava/conversation.py), and their encoding with the
built-in tokenizer (labels, slots, image tokens). The real-vocabulary ids are in test_llama_tokenizer.py."""

from __future__ import annotations

import random

import pytest

from gsva import prompts
from gsva.config import CONVERSATIONS, preset
from gsva.tokens import build_builtin_tokenizer, token_ids

V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny")


def test_templates_are_the_official_conv_types(cfg):
    assert tuple(prompts.TEMPLATES) == CONVERSATIONS == ("llava_v1", "llava_llama_2")
    assert prompts.LLAVA_V1.system == V1_SYSTEM and prompts.LLAVA_LLAMA_2.system == LLAMA2_SYSTEM
    # every official script runs the default llava_v1, 13B included
    assert {preset(n).conversation for n in ("tiny", "shapes", "gsva-7b", "gsva-13b")} == {"llava_v1"}
    with pytest.raises(ValueError, match="conversation must be one of"):
        cfg.replace(conversation="vicuna_v1")


def test_evaluation_conversation_is_byte_exact(cfg):
    names = prompts.eval_names([" The Red circle. ", "all green shapes"], cfg)
    assert names == ["the red circle", "all green shapes"]
    prompt, answer = prompts.conversation(prompts.eval_question(names, cfg),
                                          prompts.eval_answer(names, [False, True], cfg), cfg)
    assert prompt + answer == (
        V1_SYSTEM + " USER: <im_start><image><im_end>\n What are the red circle, all green shapesin this image? "
        "Please output segmentation masks. ASSISTANT: Sure,the red circle:[SEG], all green shapes:[REJ].</s>")
    assert prompt.endswith(" ASSISTANT: ") and answer == "Sure,the red circle:[SEG], all green shapes:[REJ].</s>"


def test_generation_prompt_stops_at_the_assistant_role(cfg):
    prompt, answer = prompts.conversation(prompts.eval_question(["a"], cfg), None, cfg)
    assert answer == "" and prompt == (
        V1_SYSTEM + " USER: <im_start><image><im_end>\n What are ain this image? Please output segmentation masks. "
        "ASSISTANT:")


def test_llava_llama_2_conversation_is_byte_exact(cfg):
    c2 = cfg.replace(conversation="llava_llama_2")
    question = prompts.eval_question(["the cat"], c2)
    prompt, answer = prompts.conversation(question, prompts.eval_answer(["the cat"], [False], c2), c2)
    assert prompt + answer == (
        "[INST] <<SYS>>\n" + LLAMA2_SYSTEM + "\n<</SYS>>\n\n<im_start><image><im_end>\n What are the catin this "
        "image? Please output segmentation masks. [/INST] Sure,the cat:[SEG]. </s>")
    assert prompt.endswith("[/INST] ")
    generation, _ = prompts.conversation(question, None, c2)
    assert generation == prompt[:-1]


@pytest.mark.parametrize("raw, expected", [
    ("The Red Circle.", "the red circle"),  # lower-cased, trailing "." removed
    ("  a  b  .. ", "a  b  "),  # strip, lower, strip, strip('.'): nothing else, inner and freed spaces stay
    (".the cat.", "the cat"),  # strip('.') takes leading dots too
    ("all <image> shapes </s>", "all  shapes"),  # the guard: reserved token strings deleted, nothing else
    ("a <im_<image>start> b", "a  b"),  # deletion repeats until none is left
    ("the [SEG] cat", "the [seg] cat"),  # lower-cased first, "[seg]" is plain text, not the token
])
def test_eval_expression_cleaning_is_official_plus_the_reserved_token_guard(cfg, raw, expected):
    assert prompts.eval_names([raw], cfg) == [expected]


def test_train_expression_cleaning_keeps_case_and_drops_reserved_tokens(cfg):
    assert prompts.train_names([" The cat. ", "the [SEG] Cat.", ".x."], cfg) == ["The cat", "the  Cat", "x"]


def test_training_conversations_are_the_official_templates(cfg):
    names = prompts.train_names([" The Red circle.", "Nothing here"], cfg)
    assert names == ["The Red circle", "Nothing here"]  # case kept in the answer, as officially
    questions = [prompts.train_question(names, q, cfg) for q in range(4)]
    assert questions == [
        "<image>\nCan you segment the red circle, nothing here in this image?",
        "<image>\nPlease segment the red circle, nothing here in this image.",
        "<image>\nWhat are the red circle, nothing here in this image? Please respond with segmentation masks.",
        "<image>\nWhat are the red circle, nothing here in this image? Please output segmentation masks.",
    ]
    answers = [prompts.train_answer(names, [False, True], a, cfg) for a in range(5)]
    assert answers == [
        "The segmentation results are The Red circle [SEG], Nothing here [REJ].",
        "Sure, they are The Red circle:[SEG], Nothing here:[REJ].",
        "Sure, the mask of The Red circle is [SEG], the mask of Nothing here is [REJ].",
        "Sure, the segmentation of The Red circle is [SEG], the segmentation of Nothing here is [REJ].",
        "Sure, the referred The Red circle is [SEG], the referred Nothing here is [REJ].",
    ]
    seen = {prompts.training_conversation([" The Red circle."], [False], cfg, random.Random(s)) for s in range(200)}
    assert len(seen) == 20  # every (question, answer) pair is drawn
    prompt, answer = prompts.conversation(questions[0], answers[1], cfg)
    assert prompt + answer == (V1_SYSTEM + " USER: <im_start><image><im_end>\nCan you segment the red circle, nothing "
                               "here in this image? ASSISTANT: Sure, they are The Red circle:[SEG], Nothing "
                               "here:[REJ].</s>")


def test_encoding_labels_slots_and_image_tokens(cfg):
    tok, ids = build_builtin_tokenizer(cfg), token_ids(cfg)
    names = prompts.eval_names(["The red circle.", "all blue shapes"], cfg)
    enc = prompts.encode_eval(tok, ids, names, [False, True], cfg)
    assert enc.ids[0] == ids.bos and enc.ids.count(ids.bos) == 1
    assert enc.ids.count(ids.image) == cfg.vision.num_image_tokens
    assert [enc.ids[s] for s in enc.slots] == [ids.seg, ids.rej]
    trained = [t for t in enc.labels if t != prompts.IGNORE_INDEX]
    assert tok.decode(trained).strip() == "Sure,the red circle:[SEG], all blue shapes:[REJ]." and trained[-1] == ids.eos
    assert all(lab == prompts.IGNORE_INDEX for lab in enc.labels[: enc.answer_start])
    generation = prompts.encode_eval(tok, ids, names, None, cfg)
    assert enc.ids[: len(generation.ids)] == generation.ids and generation.slots == []
    with pytest.raises(ValueError, match="exactly one <image>"):
        prompts.encode(tok, ids, "no image here", "", cfg)
