"""The pretraining stages (SAM base, LLaVA base) and GSVA from both bases, on the tiny preset, in process
(Ray Train's local mode, real Ray Data): each trains a few steps, its loss falls, it validates, resumes
from its checkpoint, and the bases combine into one GSVA model."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gsva.builder import build_model
from gsva.checkpoint import combine_bases, load_checkpoint, load_model, save_checkpoint
from gsva.config import preset
from gsva.freeze import freeze
from gsva.transforms import clip_input
from jobs.prepare import main as prepare_main
from jobs.train import main as train_main
from pipeline.prepare.formats.shapes_describe import (
    ABSENT,
    CAPTION_QUESTION,
    WHERE_QUESTIONS,
    DescribedObject,
    caption,
    phrases,
    position,
    where_question,
)
from pipeline.train import state
from pipeline.train.config import InitSpec, TrainConfig, TrainConfigError
from pipeline.train.objects import load_objects
from pipeline.train.recipe import CURVE_FILE, HISTORY_FILE


@pytest.fixture(scope="module")
def shapes_data(ray_local, tmp_path_factory) -> tuple[str, str]:
    """(task shards, instances.json) of 24 Shapes-GRES images."""
    out = str(tmp_path_factory.mktemp("stage-data") / "tasks")
    assert prepare_main(["--format", "shapes", "--num-images", "24", "--seed", "3", "--out", out,
                         "--embed-images", "--rows-per-file", "8"]) == 0
    return out, f"{out}/raw/instances.json"


def run_stage(data: str, output: Path, steps: int, *args: str) -> tuple[list[dict], state.TrainState]:
    """One train job (a real Ray Train worker, so checkpoints persist) -> (history, final train state)."""
    assert train_main(["--data", data, "--val-data", data, "--val-max-images", "2", "--output", str(output),
                       "--max-steps", str(steps), "--batch-size", "2", "--checkpoint-every", "3",
                       "--shuffle-buffer", "4", "--lr", "3e-3", "--warmup-steps", "0", *args]) == 0
    _, _, train_state = state.load(str(output / state.step_dir_name(steps)))
    return json.loads((output / HISTORY_FILE).read_text()), train_state


def falls(history: list[dict], key: str = "loss") -> bool:
    values = [r[key] for r in history]
    return np.mean(values[-3:]) < np.mean(values[:3])


@pytest.mark.parametrize("stage", ["clip", "sam", "sam-dense", "llava"])
def test_pretraining_stage_learns_validates_and_resumes(shapes_data, tmp_path, stage):
    data, objects = shapes_data
    stage, _, dense = stage.partition("-")
    args = ["--stage", stage, "--objects", objects, "--preset", "tiny", *(["--dense-weight", "1"] if dense else [])]
    history, first = run_stage(data, tmp_path / stage, 6, *args)
    assert falls(history) and first.step == 6
    if stage == "sam" and dense:
        assert all(r["ce"] > 0 for r in history)  # the embedding cells' class CE (+ box L1 in the total)
        assert 0 <= history[-1]["val/object_cell_acc"] <= 1 and "val/point_iou" in history[-1]
        assert set(first.stage_head) == {"weights", "optimizer"}  # the dense head resumes too
    elif stage == "sam":
        assert all(r["ce"] == 0 for r in history)  # no text in SAM's task
        assert 0 <= history[-1]["val/point_iou"] <= 1 and 0 <= history[-1]["val/box_iou"] <= 1
        assert "val/object_cell_acc" not in history[-1] and not first.stage_head
    elif stage == "clip":
        assert all(r["bce"] == 0 and r["ce"] > 0 for r in history)  # patch classes (+ box L1 in the total)
        assert {"val/object_patch_acc", "val/background_patch_acc", "val/box_l1"} <= set(history[-1])
        assert set(first.stage_head) == {"weights", "optimizer"}  # the dense head resumes too
    else:
        assert all(r["bce"] == 0 for r in history)  # no mask in LLaVA's
        assert 0 <= history[-1]["val/answer_token_acc"] <= 1
    history, resumed = run_stage(data, tmp_path / stage, 9, *args, "--resume")
    assert [(s["step"], s["resumed"]) for s in resumed.starts] == [(0, False), (6, True)]
    assert [r["step"] for r in history] == list(range(1, 10))
    model, _, _ = load_checkpoint(str(tmp_path / stage / state.step_dir_name(9) / state.MODEL_DIR))
    fresh, _, _ = load_model("tiny")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    trained = {"sam": ("sam.",), "clip": ("mllm.model.vision_tower.",), "llava": ("mllm.",)}[stage]
    assert changed and all(k.startswith(trained) for k in changed)


def test_gsva_from_both_bases_combines_them_and_trains_lora(shapes_data, tmp_path):
    data, _ = shapes_data
    llava, tok, _ = load_model("tiny")
    sam, _, _ = load_model("tiny")
    with torch.no_grad():
        for p in sam.sam.parameters():
            p.add_(0.01)
        for p in llava.mllm.parameters():
            p.mul_(1.01)
    save_checkpoint(sam, tok, str(tmp_path / "sam-base"))
    save_checkpoint(llava, tok, str(tmp_path / "llava-base"))
    tiny = preset("tiny")
    save_checkpoint(build_model(tiny.replace(sam=replace(tiny.sam, decoder_depth=1))), tok,
                    str(tmp_path / "other-sam"))
    with pytest.raises(ValueError, match="sam.decoder_depth"):
        combine_bases(str(tmp_path / "other-sam"), str(tmp_path / "llava-base"))
    # only the SAM half must agree: a LLaVA base whose CLIP pads combines with a SAM base that never saw CLIP
    llava.cfg = llava.cfg.replace(vision=replace(llava.cfg.vision, aspect="pad"))
    save_checkpoint(llava, tok, str(tmp_path / "llava-base"))
    combined, _, report = combine_bases(str(tmp_path / "sam-base"), str(tmp_path / "llava-base"))
    assert combined.cfg.vision.aspect == "pad"
    assert report["sam_tensors"] > 0
    for k, v in combined.state_dict().items():
        assert torch.equal(v, (sam if k.startswith("sam.") else llava).state_dict()[k]), k
    export = tmp_path / "export"
    history, final = run_stage(data, tmp_path / "gsva", 6, "--sam-base", str(tmp_path / "sam-base"),
                               "--llava-base", str(tmp_path / "llava-base"), "--export", str(export))
    assert falls(history, "ce") and final.step == 6
    assert json.loads((export / "run.json").read_text())["policy"] == "lora"
    assert (export / CURVE_FILE).exists()


def test_stage_options_are_checked(shapes_data, tmp_path):
    data, objects = shapes_data
    with pytest.raises(TrainConfigError, match="needs --objects"):
        TrainConfig(data=data, output=str(tmp_path), max_steps=1, stage="sam", init=InitSpec(preset="tiny")).validate()
    with pytest.raises(TrainConfigError, match="go together"):
        TrainConfig(data=data, output=str(tmp_path), max_steps=1, init=InitSpec(sam_base="x")).validate()
    with pytest.raises(TrainConfigError, match="applies to --stage sam only"):
        TrainConfig(data=data, output=str(tmp_path), max_steps=1, stage="clip", objects=objects, dense_weight=1.0,
                    init=InitSpec(preset="tiny")).validate()
    with pytest.raises(TrainConfigError, match="only applies to the pretraining"):
        TrainConfig(data=data, output=str(tmp_path), max_steps=1, objects=objects,
                    init=InitSpec(preset="tiny")).validate()
    with pytest.raises(SystemExit):
        train_main(["--data", data, "--output", str(tmp_path / "x"), "--max-steps", "1", "--preset", "tiny",
                    "--stage", "nope"])


def test_objects_index_and_masks(shapes_data):
    _, objects = shapes_data
    index, corrupt = load_objects(objects)
    assert corrupt == 0 and len(index) == 24
    first = next(iter(index.values()))
    assert all(o.category in ("circle", "square", "triangle") and "color" in o.attributes for o in first)


def test_description_grammar():
    objs = [DescribedObject("red", "circle", 10, 10), DescribedObject("blue", "circle", 90, 50),
            DescribedObject("red", "square", 50, 95)]
    assert position(objs[0], 100, 100) == "top far left" and position(objs[2], 100, 100) == "bottom centre"
    question, answer = caption(objs, 100, 100)
    assert question == CAPTION_QUESTION
    assert answer == ("There are three shapes: top far left red circle, bottom centre red square, "
                      "middle far right blue circle.")
    table = phrases(objs)
    assert [o.color for o in table["the leftmost circle"]] == ["red"]
    assert len(table["all red shapes"]) == 2 and table["the green square"] == [] and "all squares" in table
    q, a = where_question(objs, 100, 100, 3, random.Random(0))
    form = next(f for f in WHERE_QUESTIONS if q.startswith(f.split("{")[0]))
    asked = q.removeprefix(form.split("{")[0]).removesuffix(form.split("}")[1]).split(", ")
    assert len(asked) == 3 and a.startswith("Sure, ") and all(f"{p}: " in a for p in asked)
    answer = where_question(objs, 100, 100, 20, random.Random(0))[1]
    assert "the leftmost circle: top far left red circle" in answer
    for p in asked:
        assert (f"{p}: {ABSENT}" in a) == (table[p] == [])


def test_sam_prompts_lie_on_their_objects():
    from gsva.sam_training import ObjectSample, make_prompt_batch

    cfg = preset("tiny")
    mask = np.zeros((40, 80), dtype=bool)
    mask[10:20, 50:70] = True
    batch = make_prompt_batch([ObjectSample(np.zeros((40, 80, 3), np.uint8), [mask])], cfg, random.Random(0),
                              kinds=("point",))
    x, y = (batch.prompts[0][0] / (cfg.sam.image_size / 80)).tolist()
    assert mask[int(y), int(x)]
    batch = make_prompt_batch([ObjectSample(np.zeros((40, 80, 3), np.uint8), [mask])], cfg, random.Random(0),
                              kinds=("box",))
    x0, y0, x1, y1 = (batch.prompts[0][0] / (cfg.sam.image_size / 80)).tolist()
    assert 48 <= x0 <= 52 and 69 <= x1 <= 72 and 9 <= y0 <= 11 and 19 <= y1 <= 21


def test_sam_embedding_cells_label_the_object_in_sams_frame():
    """A wide image: SAM resizes its longest side and pads the bottom, so a far-left object lands in the
    first column of cells and the rows below the resized image stay background."""
    from gsva.sam_training import ObjectSample, make_prompt_batch

    cfg = preset("tiny")  # SAM 64 px, 8 x 8 cells of 8 px
    image = np.zeros((40, 160, 3), np.uint8)  # resized to 16 x 64: two rows of cells, then padding
    mask = np.zeros((40, 160), bool)
    mask[0:40, 0:20] = True
    batch = make_prompt_batch([ObjectSample(image, [mask], [5])], cfg, random.Random(0), dense=True)
    labels = batch.cell_labels[0].reshape(8, 8)
    assert labels[:2, 0].tolist() == [5, 5] and labels[:, 1:].sum() == 0 and labels[2:].sum() == 0
    cx, cy, w, h = batch.cell_boxes[0].reshape(8, 8, 4)[0, 0].tolist()
    assert abs(cx - 4 / 64) < 0.02 and abs(w - 8 / 64) < 0.02 and abs(h - 16 / 64) < 0.02
    with pytest.raises(ValueError, match="one class label per object"):
        make_prompt_batch([ObjectSample(image, [mask])], cfg, random.Random(0), dense=True)


def test_policies_train_only_their_parts():
    model, _, _ = load_model("tiny")
    freeze(model, "sam")
    trained = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder"}
    freeze(model, "clip")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("vision_tower" in n for n in trained)
    freeze(model, "projector")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("multi_modal_projector" in n for n in trained)
    freeze(model, "mllm")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trained) and any("lm_head" in n for n in trained)
    assert any("embed_tokens" in n for n in trained) and not any("vision_tower" in n or "sam." in n for n in trained)


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_clip_views_and_patch_targets_share_one_geometry(aspect):
    """A wide image: the crop cuts its far-left object off, the pad keeps it; either way the dense
    targets label exactly the patches where the CLIP view shows the object."""
    from gsva.vision_pretraining import DenseSample, patch_targets

    vision = replace(preset("tiny").vision, aspect=aspect)  # 32 px, 4 x 4 patches of 8 px
    image = np.full((40, 120, 3), 200, np.uint8)
    mask = np.zeros((40, 120), bool)
    mask[10:30, 2:22] = True
    image[mask] = (220, 40, 40)
    view = clip_input(image, vision)
    red = (view[0] > 1.0) & (view[1] < 0)  # CLIP-normalised red
    labels, boxes = patch_targets(DenseSample(image, [mask], [7]), vision)
    shown = red.reshape(4, 8, 4, 8).float().mean((1, 3)).reshape(-1)
    if aspect == "crop":
        assert not red.any() and not labels.any()  # cut off by the centre crop
    else:
        touched = red.reshape(4, 8, 4, 8).any(3).any(1).reshape(-1)
        assert red.any() and labels[shown.argmax()] == 7 and not labels[~touched].any()
        cx = boxes[labels == 7][0, 0]
        assert 0 < cx < 0.25  # the box says: far left
