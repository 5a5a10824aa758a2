"""The train job's parts without Ray: config, schedule, sampling, checkpoint folders, init, curve, scoring."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gsva.builder import build_model
from gsva.config import preset
from gsva.freeze import freeze
from gsva.predictor import ExpressionResult, GSVAPredictor
from gsva.tokens import build_builtin_tokenizer
from gsva.training import make_batch, training_loss
from jobs.train import build_config, build_parser
from pipeline import masks as rle
from pipeline.score.metrics import ScoreStats, score_expressions
from pipeline.train import parallel, state
from pipeline.train.config import InitSpec, OptimConfig, ScalingSpec, TrainConfig, TrainConfigError
from pipeline.train.curve import render
from pipeline.train.data import (
    DecodeRow,
    EpochStats,
    draw_samples,
    gt_masks,
    labelled,
    sample_batches,
)
from pipeline.train.launch import with_absolute_paths
from pipeline.train.optim import build_optimizer, lr_factor, set_lr
from pipeline.train.recipe import initial_model
from pipeline.train.validation import expression_inputs


def square_mask(h: int, w: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y:y + side, x:x + side] = True
    return m


def image_row(image_id: str, n_target: int, n_empty: int, h: int = 40, w: int = 48, error: str = "") -> dict:
    """A decoded row as the ingestion stage emits it (numpy pixels, expressions with RLE ground truth)."""
    exprs = [{"expression_id": f"{image_id}-{i}", "text": f"thing {i}", "no_target": False,
              "gt_mask": rle.encode(square_mask(h, w, 2 * i, 3 * i, 6)), "gt_boxes": [[3.0 * i, 2.0 * i, 6.0, 6.0]]}
             for i in range(n_target)]
    exprs += [{"expression_id": f"{image_id}-n{i}", "text": f"nothing {i}", "no_target": True,
               "gt_mask": rle.empty(h, w), "gt_boxes": []} for i in range(n_empty)]
    return {"image_id": image_id, "pixels": np.full((h, w, 3), 128, dtype=np.uint8), "expressions": exprs,
            "error": error}


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def tiny_config(tmp_path, **changes) -> TrainConfig:
    base = dict(data=str(tmp_path / "data"), output=str(tmp_path / "run"), init=InitSpec(preset="tiny"), max_steps=3)
    return TrainConfig(**{**base, **changes})


# ---------------------------------------------------------------------------------------------- config
def test_local_paths_become_absolute_on_the_driver(tmp_path, monkeypatch):
    """Ray Train runs workers in their own directory: a relative --output put the curve under Ray's session."""
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(TrainConfig(data="data/tasks", output="runs/a", val_data="data/tasks",
                                          export="ckpt", init=InitSpec(checkpoint="init", preset="tiny"),
                                          max_steps=1))
    assert (cfg.data, cfg.output, cfg.export, cfg.init.checkpoint) == (
        str(tmp_path / "data/tasks"), str(tmp_path / "runs/a"), str(tmp_path / "ckpt"), str(tmp_path / "init"))
    remote = with_absolute_paths(tiny_config(tmp_path, output="s3://bucket/runs/a", data="file:///x"))
    assert (remote.output, remote.data) == ("s3://bucket/runs/a", "file:///x")


def test_config_refuses_bad_values_naming_the_option(tmp_path):
    for changes, option in [({"max_steps": 0}, "--max-steps"), ({"batch_size": 0}, "--batch-size"),
                            ({"optim": OptimConfig(lr=-1)}, "--lr"), ({"precision": "fp8"}, "--precision"),
                            ({"scaling": ScalingSpec(workers=0)}, "--workers"),
                            ({"scaling": ScalingSpec(strategy="zero3")}, "--strategy"),
                            ({"init": InitSpec()}, "--preset"), ({"init": InitSpec(preset="gsva-7b")}, "--init"),
                            ({"init": InitSpec(preset="gsva-7b", checkpoint="x.bin")}, "--llava"),
                            ({"init": InitSpec(preset="tiny", llava="l")}, "--llava"),
                            ({"checkpoint_every": 0}, "--checkpoint-every"),
                            ({"export_dtype": "int8"}, "--export-dtype")]:
        with pytest.raises(TrainConfigError, match=option):
            tiny_config(tmp_path, **changes).validate()


def test_cli_builds_the_config_and_trainable_policy_defaults(tmp_path):
    common = ["--data", "d", "--output", "o", "--max-steps", "5"]
    cfg = build_config(build_parser().parse_args([*common, "--preset", "shapes"]))
    assert cfg.trainable_policy() == "all" and cfg.optim == OptimConfig() and cfg.optim.betas == (0.9, 0.95)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (3e-4, 100, 1.0)
    cfg = build_config(build_parser().parse_args([*common, "--preset", "tiny", "--init", "ckpt"]))
    assert cfg.trainable_policy() == "lora"
    cfg = build_config(build_parser().parse_args([*common, "--init", "ckpt", "--full", "--workers", "2",
                                                  "--strategy", "fsdp", "--gpus-per-worker", "1"]))
    assert cfg.trainable_policy() == "all" and cfg.scaling.use_gpu and cfg.scaling.strategy == "fsdp"
    assert build_config(build_parser().parse_args([*common, "--preset", "tiny", "--lora-r", "2"])).trainable_policy() \
        == "lora"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*common, "--preset", "tiny", "--lora-r", "2", "--full"])
    assert tiny_config(tmp_path).autocast_dtype(on_gpu=True) == torch.bfloat16
    assert tiny_config(tmp_path).autocast_dtype(on_gpu=False) is None


def test_lr_warms_up_then_decays_linearly_to_zero():
    assert [lr_factor(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(11, 4, 12) == pytest.approx(1 / 8) and lr_factor(12, 4, 12) == 0.0
    assert lr_factor(0, 0, 10) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert set_lr(opt, OptimConfig(lr=1e-3, warmup_steps=2), 0, 10) == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


# ------------------------------------------------------------------------------------------------ data
def test_one_sample_per_image_with_min_k_expressions_and_all_no_target_draws_dropped():
    """Official: a draw whose parts are all [REJ] is replaced by a fresh random sample (``__getitem__(0)`` in
    random-sampling mode); here it is dropped and the stream's next sample takes its place."""
    row = image_row("7", n_target=1, n_empty=3)
    exprs = labelled(row["expressions"])
    seen, dropped = set(), 0
    for seed in range(40):
        drawn = draw_samples(row["pixels"], exprs, "7", 3, random.Random(seed))
        if not drawn:
            dropped += 1
            continue
        (sample,) = drawn
        assert len(sample.names) == 3 == len(set(sample.names))
        assert any(name.startswith("thing") for name in sample.names)  # never all no-target
        for name, mask in zip(sample.names, sample.masks):
            assert mask.any() == name.startswith("thing") and mask.shape == (40, 48)
        seen |= set(sample.names)
    assert 0 < dropped < 40  # 1 in 4 draws of 3 out of (1 target + 3 empty) are all no-target
    assert seen == {e["text"] for e in exprs}  # every expression gets drawn over the epochs
    (small,) = draw_samples(row["pixels"], exprs[:2], "7", 3, random.Random(0))
    assert len(small.names) == 2
    only_empty = [e for e in exprs if not e["text"].startswith("thing")]
    assert draw_samples(row["pixels"], only_empty, "7", 2, random.Random(0)) == []
    stats = EpochStats()
    empty_row = image_row("8", n_target=0, n_empty=2)
    assert list(sample_batches(iter([as_batch([empty_row])]), 1, 3, random.Random(0), stats)) == []
    assert (stats.images, stats.all_rejected, stats.samples) == (1, 1, 0)


def test_batches_have_exact_size_and_unusable_rows_are_counted():
    rows = [image_row("1", 2, 1), image_row("2", 0, 0), image_row("3", 1, 1, error="image 3: corrupt image"),
            image_row("4", 3, 2), image_row("5", 1, 0)]
    unlabelled = image_row("6", 1, 0)
    unlabelled["expressions"][0]["gt_mask"] = None
    stats = EpochStats()
    batches = list(sample_batches(iter([as_batch(rows[:3]), as_batch([*rows[3:], unlabelled])]), 2, 3,
                                  random.Random(0), stats))
    assert all(len(b) == 2 for b in batches)
    assert (stats.images, stats.skipped_images) == (3, 3)
    assert stats.samples // 2 == len(batches) and stats.first_error == "image 2: no labelled expression"


def test_decode_keeps_a_bad_image_row_with_its_reason_and_checks_mask_sizes():
    out = DecodeRow()({"image_id": "9", "image": b"not a png", "image_uri": None, "expressions": []})
    assert out["pixels"].shape == (0, 0, 3) and "not an image" in out["error"]
    out = DecodeRow()({"image_id": "10", "image": None, "image_uri": None, "expressions": []})
    assert "neither embedded bytes nor an image_uri" in out["error"]
    row = image_row("11", 1, 0)
    with pytest.raises(ValueError, match="image 11: expression 11-0 has a \\[40, 48\\] mask for a 30x48 image"):
        gt_masks(row["pixels"][:30], row["expressions"], "11")


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_folder_round_trip_resumes_exactly_and_loads_in_the_predictor(tmp_path):
    cfg = preset("tiny")
    model, tok = build_model(cfg), build_builtin_tokenizer(cfg)
    torch.manual_seed(0)
    freeze(model, "lora")
    model.train()
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], OptimConfig())
    rows = [image_row(str(i), 2, 1) for i in range(2)]
    samples = [s for r in rows for s in draw_samples(r["pixels"], labelled(r["expressions"]), r["image_id"], 3,
                                                      random.Random(1))]
    for _ in range(2):
        training_loss(model, make_batch(samples, tok, cfg, model.token_ids, random.Random(0))).total.backward()
        opt.step()
        opt.zero_grad()
    model_state, opt_state = parallel.full_state(model, opt)
    state.save(str(tmp_path), model, tok, state.TrainState(step=2, epoch=1, optimizer=opt_state,
                                                           history=[{"step": 2, "loss": 1.0}]))
    loaded, loaded_tok, train_state = state.load(str(tmp_path))
    assert (train_state.step, train_state.epoch, train_state.history) == (2, 1, [{"step": 2, "loss": 1.0}])
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model_state.items())
    freeze(loaded, "lora")  # LoRA was saved un-merged: the same adapters keep training
    opt2 = build_optimizer([p for p in loaded.parameters() if p.requires_grad], OptimConfig())
    parallel.load_optimizer_state(loaded, opt2, train_state.optimizer)
    for group_a, group_b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    with pytest.raises(ValueError, match="does not train"):
        parallel.load_optimizer_state(loaded, opt2, {**opt_state, "param_groups": [{"params": ["nope"]}]})
    predictor = GSVAPredictor.from_checkpoint(str(tmp_path / state.MODEL_DIR))
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    result = predictor.predict([image], [["the red circle"]])[0][0]
    assert result.mask.shape == (30, 40) and result.decision in ("seg", "rej", "none")


def test_init_from_the_official_release_layout(tmp_path):
    from tests.test_gsva_checkpoint import dyadic, write_official_release

    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(0)
    target = {k: dyadic(v, gen) if v.is_floating_point() else v for k, v in build_model(cfg).state_dict().items()}
    paths = write_official_release(tmp_path, cfg, target)
    config = tiny_config(tmp_path, init=InitSpec(preset="tiny", checkpoint=paths["gsva"], llava=paths["llava"],
                                                 clip=paths["clip"], sam=paths["sam"])).validate()
    assert config.init.official and config.trainable_policy() == "lora"
    model, _ = initial_model(config)
    loaded = model.state_dict()
    assert torch.equal(loaded["sam.mask_decoder.output_upscaling.0.weight"],
                       target["sam.mask_decoder.output_upscaling.0.weight"])
    key = "mllm.model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded[key], target[key])


# ------------------------------------------------------------------------------------- curve and scores
def test_training_curve_is_a_png():
    history = [{"step": s, "loss": 3.0 / s, "ce": 1.0 / s, "bce": 0.5, "dice": 0.8, "lr": 1e-4} for s in range(1, 40)]
    history.append({**history[-1], "val/giou": 0.5, "val/ciou": 0.4, "val/n_acc": 0.9, "val/t_acc": 0.8})
    png = render(history, "tiny")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_validation_scoring_uses_the_metrics_code():
    rows = [image_row("1", 2, 1), image_row("2", 1, 1)]
    exprs = [labelled(r["expressions"]) for r in rows]
    perfect = [[ExpressionResult("rej" if e["no_target"] else "seg", e["no_target"], rle.decode(e["gt_mask"]), None,
                                 1.0, "") for e in es] for es in exprs]
    inputs = expression_inputs(list(zip(exprs, perfect)))
    metrics = ScoreStats.from_scores(score_expressions(inputs, "rela"), rec_target=~inputs.no_target).metrics()
    assert (metrics["giou"], metrics["ciou"], metrics["n_acc"], metrics["t_acc"], metrics["count"]) == (1, 1, 1, 1, 5)
    wrong = [[ExpressionResult("seg", False, ~rle.decode(e["gt_mask"]), None, 1.0, "") for e in es] for es in exprs]
    inputs = expression_inputs(list(zip(exprs, wrong)))
    metrics = ScoreStats.from_scores(score_expressions(inputs, "rela"), rec_target=~inputs.no_target).metrics()
    assert metrics["n_acc"] == 0 and metrics["t_acc"] == 1 and metrics["giou"] == 0


# ------------------------------------------------------------------------------- [SEG]/[REJ] row init
def test_seg_and_rej_rows_start_from_words(tmp_path):
    """--seg-words/--rej-words: each new token's embedding and lm_head rows are the mean of the words'
    first-token rows, so its logit is the words' mean logit; nothing else changes."""
    from gsva.token_init import first_token

    config = build_config(build_parser().parse_args(
        ["--data", str(tmp_path), "--output", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "1",
         "--seg-words", "top", "bottom", "--rej-words", "none"])).validate()
    assert (config.init.seg_words, config.init.rej_words) == (("top", "bottom"), ("none",))
    plain, _ = initial_model(tiny_config(tmp_path))
    model, tok = initial_model(config)
    ids = model.token_ids
    top, bottom, none = (first_token(tok, w) for w in ("top", "bottom", "none"))
    for get in ("get_input_embeddings", "get_output_embeddings"):
        weight, before = getattr(model.mllm, get)().weight, getattr(plain.mllm, get)().weight
        assert torch.allclose(weight[ids.seg], (before[top] + before[bottom]) / 2)
        assert torch.equal(weight[ids.rej], before[none])
        others = [i for i in range(weight.shape[0]) if i not in (ids.seg, ids.rej)]
        assert torch.equal(weight[others], before[others])
    hidden = torch.randn(3, model.cfg.llm.hidden_size)
    logits = model.mllm.get_output_embeddings()(hidden)
    assert torch.allclose(logits[:, ids.seg], (logits[:, top] + logits[:, bottom]) / 2, atol=1e-5)


def test_seg_words_are_for_the_gsva_stage_only(tmp_path):
    with pytest.raises(TrainConfigError, match="--stage gsva only"):
        tiny_config(tmp_path, stage="sam", objects="x.json",
                    init=InitSpec(preset="tiny", rej_words=("none",))).validate()
