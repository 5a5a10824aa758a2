"""bench/shapes_probe.py's prompt probe: the prompts it reads are the model's own [SEG] prompts, and its
classifier and labels mean what the README says they mean."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from gsva.predictor import GSVAPredictor

PROBE = Path(__file__).resolve().parents[1] / "bench" / "shapes_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("shapes_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seg_prompts_are_the_models_mask_prompts(probe):
    """The prompts equal text_hidden_fcs of the hidden states the model's forward reads for its masks."""
    p = GSVAPredictor.from_checkpoint("tiny", dtype=torch.float64)
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    names = ["the red circle", "all blue shapes"]
    tokens, hidden, prompts = probe.seg_prompts(p, image, names)
    assert hidden.shape == (2, p.cfg.llm.hidden_size)
    assert tokens.shape == (p.cfg.vision.num_image_tokens, p.cfg.llm.hidden_size)
    assert prompts.shape == (2, p.cfg.sam.prompt_dim)

    from gsva import prompts as conv
    from gsva.transforms import prepare_images

    encoded = conv.encode_eval(p.tokenizer, p.model.token_ids, conv.eval_names(names, p.cfg), [False, False], p.cfg)
    batch = conv.collate([encoded], p.model.token_ids.pad)
    prep = prepare_images([image], p.cfg)
    with torch.no_grad():
        out = p.model(batch.input_ids, batch.attention_mask, prep.clip_pixels, prep.sam_pixels, torch.tensor([0]))
        expected = p.model.text_hidden_fcs(out.hidden[out.mask_rows, out.mask_cols])
    torch.testing.assert_close(prompts, expected)
    torch.testing.assert_close(hidden, out.hidden[out.mask_rows, out.mask_cols])


def test_nearest_centroid_separates_what_is_separable_and_not_noise(probe):
    rng = np.random.default_rng(0)
    labels = [["a", "b", "c"][i % 3] for i in range(300)]
    centres = {"a": 0.0, "b": 5.0, "c": 10.0}
    separable = np.array([[centres[y]] * 4 for y in labels]) + rng.normal(size=(300, 4))
    assert probe.nearest_centroid(separable, labels) == {"accuracy": 1.0, "chance": 0.333, "n_test": 150}
    assert probe.nearest_centroid(rng.normal(size=(300, 4)), labels)["accuracy"] < 0.5


def test_content_labels_name_one_colour_and_shape_only_where_the_template_has_one(probe):
    target = np.zeros((50, 100), dtype=bool)
    target[40:50, 0:10] = True  # centre (5, 45): bottom row, far-left column of the 5 x 5 grid
    assert probe.content_labels("the red circle", target) == {
        "template": "the {color} {shape}", "colour": "red", "shape": "circle", "row": "4", "column": "0"}
    assert probe.content_labels("all blue shapes", target) == {
        "template": "all {color} shapes", "colour": "blue", "shape": None, "row": None, "column": None}
    assert probe.content_labels("the red circle and the blue square", target)["colour"] is None
    assert probe.content_labels("the leftmost triangle", target) == {
        "template": "the leftmost/rightmost {shape}", "colour": None, "shape": None, "row": "4", "column": "0"}


def test_linear_readout_reads_a_linear_code_and_not_noise(probe):
    rng = np.random.default_rng(0)
    labels = [["a", "b", "c"][i % 3] for i in range(300)]
    code = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]}
    x = np.concatenate([np.array([code[y] for y in labels]) * 3.0, rng.normal(size=(300, 5))], 1)
    assert probe.linear_readout(x, labels)["accuracy"] == 1.0
    assert probe.linear_readout(rng.normal(size=(300, 8)), labels)["accuracy"] < 0.5
