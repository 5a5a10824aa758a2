"""Checkpoints: our format (local and S3) and the official release layout, loaded bit-exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gsva.__main__ import main as gsva_main
from gsva.builder import build_model
from gsva.checkpoint import load_checkpoint, save_checkpoint
from gsva.config import preset
from gsva.freeze import freeze
from gsva.lora import merge_lora
from gsva.official import load_official
from gsva.predictor import GSVAPredictor
from gsva.tokens import build_base_bpe, build_builtin_tokenizer


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def predict_once(p: GSVAPredictor):
    image = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return p.predict([image], [["the red circle", "all squares"]])[0]


# ------------------------------------------------------------------------------------------ our format
def test_save_load_round_trip_local(tmp_path):
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    tok = build_builtin_tokenizer(cfg)
    digest = save_checkpoint(model, tok, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, tok2, model_id = load_checkpoint(str(tmp_path / "ckpt"))
    assert model_id == f"tiny@sha256:{digest[:16]}"
    assert states_equal(model.state_dict(), loaded.state_dict()) and tok2.to_json() == tok.to_json()
    a = predict_once(GSVAPredictor(model, tok, "x"))
    b = predict_once(GSVAPredictor.from_checkpoint(str(tmp_path / "ckpt")))
    assert [(r.decision, r.score, r.mask.tobytes()) for r in a] == [(r.decision, r.score, r.mask.tobytes()) for r in b]
    # half-precision storage: values are the float16 roundings, loaded back as float32
    save_checkpoint(model, tok, str(tmp_path / "half"), dtype=torch.float16)
    half, _, _ = load_checkpoint(str(tmp_path / "half"))
    key = "mllm.lm_head.weight"
    assert half.state_dict()[key].dtype == torch.float32
    assert torch.equal(half.state_dict()[key], model.state_dict()[key].half().float())
    assert half.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="not a GSVA checkpoint"):
        load_checkpoint(str(tmp_path))


def test_lora_checkpoints_merged_and_unmerged(tmp_path):
    cfg = preset("tiny")
    model = build_model(cfg)
    freeze(model, "lora")
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    tok = build_builtin_tokenizer(cfg)
    save_checkpoint(model, tok, str(tmp_path / "unmerged"), merge=False)
    save_checkpoint(model, tok, str(tmp_path / "merged"))
    unmerged, _, _ = load_checkpoint(str(tmp_path / "unmerged"))
    merged, _, _ = load_checkpoint(str(tmp_path / "merged"))
    assert states_equal(unmerged.state_dict(), model.state_dict())
    assert not any("lora" in k for k in merged.state_dict())
    ref = predict_once(GSVAPredictor(model, tok, "x"))
    for m in (unmerged, merged):
        out = predict_once(GSVAPredictor(m, tok, "x"))
        assert [r.decision for r in out] == [r.decision for r in ref]
        assert all(abs(r.score - s.score) < 1e-5 for r, s in zip(out, ref))


def test_s3_round_trip_and_describe(s3, tmp_path, capsys):
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    tok = build_builtin_tokenizer(cfg)
    uri = f"s3://{s3.bucket}/checkpoints/tiny-ckpt"
    digest = save_checkpoint(model, tok, uri, s3.options, dtype=torch.float16)
    loaded, _, model_id = load_checkpoint(uri, s3.options)
    assert model_id.endswith(digest[:16])
    assert states_equal({k: v.half().float() if v.is_floating_point() and "gaussian" not in k else v
                         for k, v in model.state_dict().items()}, loaded.state_dict())
    assert gsva_main(["--s3-endpoint", s3.endpoint, "describe", uri]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["name"] == "tiny"


# ----------------------------------------------------------------------------- official release layout
def dyadic(t: torch.Tensor, gen: torch.Generator, denominator: int = 1024) -> torch.Tensor:
    """Random values that are exact multiples of 1/denominator, so sums/products below are exact in fp32."""
    return torch.randint(-64, 65, t.shape, generator=gen).float() / denominator


def write_official_release(root, cfg, target: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write ``target`` (our state dict) the way the official release ships it: GSVA .bin (PEFT prefix,
    un-merged LoRA on q/v, 32004-style vocab without <image>), LLaVA folder (tokenizer + Llama weights with
    a random mm_projector and a shorter vocab), HF CLIP (with a text tower), SAM .pth (different mask
    decoder, which the GSVA file overrides). Names follow the official modules, written out by hand."""
    gen = torch.Generator().manual_seed(7)
    r, scale = cfg.lora.r, cfg.lora.scaling
    prefix = "mllm.model.language_model."
    llm = {k[len(prefix):]: v for k, v in target.items() if k.startswith(prefix)}
    vocab = target["mllm.lm_head.weight"].shape[0] - 1  # the release has no <image> row
    gsva, llava = {}, {}
    for key, value in llm.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            a = torch.randint(-4, 5, (r, value.shape[1]), generator=gen).float() / 16
            b = torch.randint(-4, 5, (value.shape[0], r), generator=gen).float() / 16
            base = value - scale * (b @ a)
            module = key[: -len(".weight")]
            gsva[f"base_model.model.model.{module}.weight"] = base
            gsva[f"base_model.model.model.{module}.lora_A.default.weight"] = a
            gsva[f"base_model.model.model.{module}.lora_B.default.weight"] = b
            llava[f"model.{key}"] = base
        elif key == "embed_tokens.weight":
            gsva["base_model.model.model.embed_tokens.weight"] = value[:vocab]
            llava["model.embed_tokens.weight"] = dyadic(value[: vocab - 1], gen)
        else:
            llava[f"model.{key}"] = value
    llava["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old LLaVA checkpoints carry it
    llava["lm_head.weight"] = dyadic(target["mllm.lm_head.weight"][: vocab - 1], gen)
    llava["model.mm_projector.weight"] = dyadic(target["mllm.model.multi_modal_projector.weight"], gen)
    llava["model.mm_projector.bias"] = dyadic(target["mllm.model.multi_modal_projector.bias"], gen)
    gsva["base_model.model.lm_head.weight"] = target["mllm.lm_head.weight"][:vocab]
    for ours, theirs in (("mllm.model.multi_modal_projector.", "model.mm_projector."),
                         ("text_hidden_fcs.", "model.text_hidden_fcs."),
                         ("sam.mask_decoder.", "model.visual_model.mask_decoder."),
                         ("sam.prompt_encoder.", "model.visual_model.prompt_encoder.")):
        gsva.update({f"base_model.model.{theirs}{k[len(ours):]}": v for k, v in target.items() if k.startswith(ours)})
    clip = {"vision_model." + k[len("mllm.model.vision_tower."):]: v for k, v in target.items()
            if k.startswith("mllm.model.vision_tower.")}
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    clip["logit_scale"] = torch.tensor(2.6592)
    sam = {k[len("sam."):]: v for k, v in target.items() if k.startswith("sam.")}
    sam.update({k: dyadic(v, gen) for k, v in sam.items() if k.startswith("mask_decoder.")})
    paths = {"gsva": str(root / "gsva-tiny-ft-gres.bin"), "llava": str(root / "llava"),
             "clip": str(root / "clip" / "model.safetensors"), "sam": str(root / "sam_vit_tiny.pth")}
    os.makedirs(paths["llava"])
    os.makedirs(os.path.dirname(paths["clip"]))
    torch.save(gsva, paths["gsva"])
    torch.save(llava, os.path.join(paths["llava"], "pytorch_model.bin"))
    build_base_bpe(cfg).save(paths["llava"])
    from safetensors.torch import save_file

    save_file(clip, paths["clip"])
    torch.save(sam, paths["sam"])
    return paths


def test_official_layout_loads_bit_exactly(tmp_path, capsys):
    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(0)
    target = {k: dyadic(v, gen) if v.is_floating_point() else v for k, v in build_model(cfg).state_dict().items()}
    paths = write_official_release(tmp_path, cfg, target)
    model, tok, report = load_official(cfg, **paths)
    assert report.ok() and report.added_vocab_rows == 1 and report.ignored == 3
    assert len(report.merged_lora) == 2 * cfg.llm.num_layers
    assert tok.to_json() == build_builtin_tokenizer(cfg).to_json()
    loaded = model.state_dict()
    image_row = model.token_ids.image
    for key, value in target.items():
        if key in ("mllm.lm_head.weight", "mllm.model.language_model.embed_tokens.weight"):
            assert torch.equal(loaded[key][:image_row], value[:image_row]), key
            assert torch.allclose(loaded[key][image_row], value[:image_row].mean(0))
        else:
            assert torch.equal(loaded[key], value), key
    # the same through the CLI, into our format
    out = str(tmp_path / "converted")
    assert gsva_main(["convert", "--preset", "tiny", "--dtype", "float32", "--output", out,
                      *[f"--{k}={v}" for k, v in paths.items()]]) == 0
    assert json.loads(capsys.readouterr().out)["unexpected_keys"] == []
    assert states_equal(load_checkpoint(out)[0].state_dict(), loaded)


def test_official_layout_fails_loudly_on_shape_mismatch(tmp_path):
    cfg = preset("tiny")
    target = build_model(cfg).state_dict()
    paths = write_official_release(tmp_path, cfg, target)
    sam = torch.load(paths["sam"], weights_only=True)
    sam["image_encoder.patch_embed.proj.weight"] = torch.zeros(3, 3)
    sam["mask_decoder.iou_token.weight"] = torch.zeros(2, 2)  # wrong even though the GSVA file overrides it
    torch.save(sam, paths["sam"])
    with pytest.raises(ValueError, match="2 shape mismatches") as err:
        load_official(cfg, paths["gsva"], paths["llava"], paths["clip"], paths["sam"])
    assert "sam image_encoder.patch_embed.proj.weight: (3, 3) vs model" in str(err.value)
    os.remove(paths["sam"])
    with pytest.raises(ValueError, match="in none of the given files.*sam.image_encoder"):
        load_official(cfg, paths["gsva"], paths["llava"], paths["clip"], None)


def test_merge_lora_is_w_plus_scaled_b_a():
    w, a, b = torch.ones(3, 2), torch.full((1, 2), 0.5), torch.full((3, 1), 0.25)
    out = merge_lora({"m.q.base_layer.weight": w, "m.q.base_layer.bias": torch.zeros(3),
                      "m.q.lora_A.default.weight": a, "m.q.lora_B.default.weight": b}, scaling=2.0)
    assert set(out) == {"m.q.weight", "m.q.bias"}
    assert torch.equal(out["m.q.weight"], torch.full((3, 2), 1.25))
