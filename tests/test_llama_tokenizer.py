"""Token-id parity with the official GSVA code on the real LLaMA 32k vocabulary.

tests/fixtures/llama/tokenizer.model is LLaMA's sentencepiece model rebuilt from llama-tokenizer-js 1.2.2
(build_llama_tokenizer.py; it reproduces that package's real-LLaMA test cases, checked again here).
tests/fixtures/llama/official_ids.json holds what the official code computes for the official evaluation,
generation, training and llava_llama_2 conversations: recorded by record_official_ids.py with the official
environment's transformers 4.44.2 slow LlamaTokenizer, GSVA's add_task_tokens and the tokenizer_image_token
and collate_fn label algorithms. Here this project builds the same conversations (gsva.prompts) and encodes
them with its own tokenizer path (gsva.llama_tokenizer): strings, ids and labels must be identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gsva import prompts
from gsva.config import preset
from gsva.llama_tokenizer import LlamaSentencePiece
from gsva.tokens import add_gsva_tokens, check_tokenizer, load_pretrained_tokenizer, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "llama"
OFFICIAL = json.loads((FIXTURE / "official_ids.json").read_text(encoding="utf-8"))
IMAGE_TOKEN_INDEX = -200


@pytest.fixture(scope="module")
def cfg():
    return preset("gsva-7b")


@pytest.fixture(scope="module")
def tok(cfg):
    tok = add_gsva_tokens(load_pretrained_tokenizer(str(FIXTURE)), cfg)
    check_tokenizer(tok, cfg)
    return tok


def official_form(enc: prompts.Encoded, image_id: int) -> tuple[list[int], list[int]]:
    """Our ids/labels with the run of image placeholders collapsed to the official sentinel -200."""
    ids, labels = [], []
    for tid, lab in zip(enc.ids, enc.labels):
        if tid == image_id:
            if ids and ids[-1] == IMAGE_TOKEN_INDEX:
                continue
            tid = IMAGE_TOKEN_INDEX
        ids.append(tid)
        labels.append(lab)
    return ids, labels


def our_conversations(cfg) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) of every recorded case, built by gsva.prompts from the same inputs."""
    evals, trains = OFFICIAL["eval"]["sents"], OFFICIAL["train"]["cases"]
    llama2 = cfg.replace(conversation="llava_llama_2")
    out = []
    for kind, c, cases in (("eval", cfg, evals), ("generate", cfg, evals[:2]), ("eval_llama_2", llama2, evals[:2]),
                           ("generate_llama_2", llama2, evals[:1])):
        for sents, flags in cases:
            names = prompts.eval_names(sents, c)
            answer = None if kind.startswith("generate") else prompts.eval_answer(names, flags, c)
            out.append((kind, c, *prompts.conversation(prompts.eval_question(names, c), answer, c)))
    for sents, flags, q, a in trains:
        names = prompts.train_names(sents, cfg)
        question, answer = prompts.train_question(names, q, cfg), prompts.train_answer(names, flags, a, cfg)
        out.append(("train", cfg, *prompts.conversation(question, answer, cfg)))
    order = [c["kind"] for c in OFFICIAL["cases"]]
    return sorted(out, key=lambda x: order.index(x[0]))


def test_fixture_is_the_real_llama_vocabulary():
    """The rebuilt model reproduces llama-tokenizer-js's real-LLaMA cases (BOS, spaces, bytes, a long text)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    cases = json.loads((FIXTURE / "js_cases.json").read_text(encoding="utf-8"))
    assert len(cases) == 12 and sp.get_piece_size() == 32000
    for case in cases:
        assert [1] + sp.encode(case["text"]) == case["ids"], case["text"][:30]


def test_task_token_ids_and_lisa_55(tok, cfg):
    ids = check_tokenizer(tok, cfg)
    assert (ids.seg, ids.rej, ids.im_start, ids.im_end, ids.image) == (32000, 32001, 32002, 32003, 32004)
    assert OFFICIAL["added"] == {"[SEG]": 32000, "[REJ]": 32001, "<im_start>": 32002, "<im_end>": 32003}
    assert (OFFICIAL["seg_token_idx"], OFFICIAL["rej_token_idx"]) == (ids.seg, ids.rej)
    assert tok.encode("[SEG]")[0] == OFFICIAL["seg_alone"] == [1, 32000]  # the slow path: no lone "▁"
    # the ids come from the vocabulary, never from position 0 of an encoding: "a[SEG]" starts with "▁a"
    assert tok.encode("a [SEG]", add_bos=False)[0] == [263, 29871, 32000]


def test_conversation_strings_and_ids_equal_the_official_ones(tok, cfg):
    ours = our_conversations(cfg)
    assert [k for k, *_ in ours] == [c["kind"] for c in OFFICIAL["cases"]] and len(ours) == 14
    for (kind, c, prompt, answer), official in zip(ours, OFFICIAL["cases"]):
        text = (prompt + answer) if answer else prompt
        assert text == official["text"], kind
        token_ids = check_tokenizer(tok, c)
        enc = prompts.encode(tok, token_ids, prompt, answer, c)
        ids, labels = official_form(enc, token_ids.image)
        assert ids == official["ids"], (kind, text)
        if official["labels"] is not None:
            assert labels == official["labels"], (kind, text)
        assert len(enc.slots) == (official["ids"].count(32000) + official["ids"].count(32001))


def test_the_fast_tokenizer_would_not_give_the_official_ids():
    """Why the slow path: transformers' fast Llama tokenizer differs on most of these conversations."""
    differ = [c["kind"] for c in OFFICIAL["cases"] if c["fast_ids"] != c["ids"]]
    assert len(differ) >= 10 and "eval" in differ


def test_training_batch_uses_the_same_ids(tok, cfg):
    """make_batch's path (training_conversation -> conversation -> encode) on the real vocabulary."""
    question, answer = prompts.training_conversation(["The dog."], [False], cfg, random.Random(0))
    prompt, full = prompts.conversation(question, answer, cfg)
    enc = prompts.encode(tok, check_tokenizer(tok, cfg), prompt, full, cfg)
    assert enc.ids[0] == 1 and enc.ids.count(1) == 1 and enc.ids.count(32004) == cfg.vision.num_image_tokens
    trained = [t for t in enc.labels if t != prompts.IGNORE_INDEX]
    assert tok.decode(trained) == answer and trained[-1] == 2


def test_saved_with_a_checkpoint_and_loaded_back(tok, cfg, tmp_path):
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, LlamaSentencePiece) and len(again) == len(tok) == 32005
    text = OFFICIAL["cases"][0]["text"].replace("<image>", "")
    assert again.encode(text) == tok.encode(text)
    (tmp_path / "tokenizer_config.json").write_text('{"legacy": false}')
    with pytest.raises(ValueError, match="legacy=false"):
        LlamaSentencePiece.from_pretrained(str(tmp_path))
