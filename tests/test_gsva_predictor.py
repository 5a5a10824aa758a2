"""GSVAPredictor: both inference modes on a hand-forced answer, batching with padding, free generation's
answer parsing, and bad images at the boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsva import decoding, prompts
from gsva.answers import match_slots
from gsva.predictor import ExpressionResult, GSVAPredictor
from gsva.transforms import ImageError, prepare_images

EXPRESSIONS = [["the red circle", "all blue shapes", "the leftmost square", "the green triangle"], ["all circles"]]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def forced_predictor(images):
    """Tiny model in float64 whose LM can only say [SEG] or [REJ]: lm_head is zero except
    row[SEG] = +c (h0 - h1), row[REJ] = -c (h0 - h1), with h0, h1 the hidden states before the first two
    slots of image 0. All hidden states have the same norm (RMSNorm, unit weight), so slot 0 is [SEG]
    and slot 1 [REJ]: decisions are hand-forced, mixed, and argmax over the full vocabulary is one of them."""
    p = GSVAPredictor.from_checkpoint("tiny", dtype=torch.float64)
    cfg, ids = p.cfg, p.model.token_ids
    names = EXPRESSIONS[0][:3]
    enc = prompts.encode_eval(p.tokenizer, ids, prompts.eval_names(names, cfg), [False] * 3, cfg)
    prep = prepare_images(images[:1], cfg)
    with torch.no_grad():
        tokens, _ = p.model.encode_images(prep.clip_pixels, prep.sam_pixels)
        dec, _ = decoding.teacher_forced(p.model, [enc], tokens)
        direction = dec[0].slots[0].hidden - dec[0].slots[1].hidden
        weight = p.model.mllm.lm_head.weight
        weight.zero_()
        weight[ids.seg] = direction
        weight[ids.rej] = -direction
    return p


def test_generate_and_teacher_forced_agree_on_forced_answer(forced_predictor, images):
    p = forced_predictor
    gen = p.predict(images, EXPRESSIONS, max_expressions_per_prompt=3)
    decisions = [[r.decision for r in rs] for rs in gen]
    assert decisions[0][:2] == ["seg", "rej"]  # mixed, as forced by construction
    assert all(d in ("seg", "rej") for ds in decisions for d in ds)
    tf = p.predict(images, EXPRESSIONS, mode="teacher-forced", no_target=[[d == "rej" for d in ds] for ds in decisions],
                   max_expressions_per_prompt=3)
    for g_img, t_img, image in zip(gen, tf, images):
        for g, t in zip(g_img, t_img):
            assert isinstance(g, ExpressionResult) and g.forced_mask is None
            assert t.decision == g.decision and t.rejected == g.rejected
            assert t.score == pytest.approx(g.score, abs=1e-9)
            assert t.answer == g.answer
            assert g.mask.shape == t.mask.shape == t.forced_mask.shape == image.shape[:2]
            assert g.mask.dtype == bool and (g.mask.any() == (g.decision == "seg") or g.decision == "seg")
            assert not t.mask.any() if t.rejected else np.array_equal(t.mask, t.forced_mask)
    # Same context up to the first [REJ]: the first [SEG]'s mask is the same in both modes.
    assert np.array_equal(gen[0][0].mask, tf[0][0].forced_mask)
    # K=3: image 0 is asked in two conversations; "Sure,a:[SEG], b:[REJ], c:..." for the first (official form)
    assert gen[0][0].answer.startswith("Sure,the red circle:[SEG], all blue shapes:[REJ], the leftmost square:")
    assert gen[0][3].answer.startswith("Sure,the green triangle:")
    # by default (the GSVA protocol) all four expressions of image 0 share one conversation
    together = p.predict(images, EXPRESSIONS)[0]
    assert len({r.answer for r in together}) == 1 and "[REJ], the leftmost square:" in together[0].answer
    assert together[0].answer.count(", ") == 3 and together[0].answer.startswith("Sure,the red circle:")


def test_batched_with_padding_equals_one_image_at_a_time(forced_predictor, images):
    p = forced_predictor
    both = p.predict(images, EXPRESSIONS, max_expressions_per_prompt=2)
    for i, image in enumerate(images):
        alone = p.predict([image], [EXPRESSIONS[i]], max_expressions_per_prompt=2)[0]
        for a, b in zip(both[i], alone):
            assert (a.decision, a.answer) == (b.decision, b.answer)
            assert a.score == pytest.approx(b.score, abs=1e-9)
            assert np.array_equal(a.mask, b.mask)


def test_free_generation_reports_what_it_could_not_match(forced_predictor, images):
    # This LM only ever says [SEG]/[REJ] (never a phrase, never </s>): slots are taken in order.
    res = forced_predictor.predict(images[:1], [EXPRESSIONS[0][:2]], decoding="free")[0]
    assert all(r.decision in ("seg", "rej") for r in res)
    assert "phrase mismatch" in res[0].note and "extra slot" in res[0].note
    assert all(r.mask.any() == (r.decision == "seg") for r in res)


def test_match_slots_handles_repeats_skips_and_reorders():
    names = ["the red circle", "all blue shapes", "the red circle and the blue square"]
    m = match_slots([" Sure, all blue shapes:", ", the red circle and the blue square:", ", all blue shapes:"], names)
    assert m.slot_to_expr == [1, 2, None]
    assert "repeated" in m.notes[1][0] and "missing" in m.notes[0][0]
    m = match_slots(["Sure, the red circle:", "the purple thing:"], names[:2])
    assert m.slot_to_expr == [0, 1] and "phrase mismatch" in m.notes[1][0]
    assert match_slots([], names[:1]).notes[0][0].startswith("missing")


def test_random_tiny_model_runs_every_mode(images):
    p = GSVAPredictor.from_checkpoint("tiny")
    assert p.model_id == "preset:tiny@seed0"
    flags = [[False, True, False, True], [True]]
    for kwargs in ({}, {"decoding": "free"}, {"mode": "teacher-forced", "no_target": flags}):
        out = p.predict(images, EXPRESSIONS, **kwargs)
        assert [len(r) for r in out] == [4, 1]
        for results, image in zip(out, images):
            for r in results:
                assert r.mask.shape == image.shape[:2] and 0.0 <= r.score <= 1.0
                assert r.decision in ("seg", "rej", "none") and r.answer
                assert not r.mask.any() if r.rejected else r.decision != "rej"
    assert p.predict([images[0]], [[]]) == [[]]
    with pytest.raises(ValueError, match="no_target"):
        p.predict(images, EXPRESSIONS, mode="teacher-forced")
    with pytest.raises(ValueError, match="mode"):
        p.predict(images, EXPRESSIONS, mode="beam")


def test_bad_images_are_handled_or_rejected_clearly():
    p = GSVAPredictor.from_checkpoint("tiny")
    rng = np.random.default_rng(1)
    handled = {
        "grayscale": rng.integers(0, 256, (20, 30), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),
        "16-bit": rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16),
        "1x1": np.full((1, 1, 3), 200, dtype=np.uint8),
    }
    out = p.predict(list(handled.values()), [["the red circle"]] * len(handled))
    for (name, image), res in zip(handled.items(), out):
        assert res[0].mask.shape == image.shape[:2], name
    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (10_000, 10_000, 3))  # a view: no memory
    with pytest.raises(ImageError, match="image 1: .*exceeds"):
        p.predict([handled["1x1"], huge], [["a"], ["b"]])
    with pytest.raises(ImageError, match="image 0: expected uint8"):
        p.predict([np.zeros((4, 4, 3), dtype=np.float32)], [["a"]])
    with pytest.raises(ImageError, match="shape"):
        p.predict([np.zeros((4, 4, 5), dtype=np.uint8)], [["a"]])
    with pytest.raises(ImageError, match="empty"):
        p.predict([np.zeros((0, 4, 3), dtype=np.uint8)], [["a"]])
