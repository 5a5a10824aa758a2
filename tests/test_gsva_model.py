"""GSVA architecture: presets, parameter counts vs the published architectures, the [SEG] prompt rule,
tokens and the conversation encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gsva import prompts
from gsva.__main__ import main as gsva_main
from gsva.__main__ import parameter_counts
from gsva.builder import build_model
from gsva.config import PRESETS, GSVAConfig, preset
from gsva.modeling import seg_prompt_positions
from gsva.tokens import build_builtin_tokenizer, check_tokenizer, token_ids
from gsva.transforms import prepare_images


# ------------------------------------------------------------------ official parameter counts, by hand
def llama(vocab: int, h: int, inter: int, layers: int) -> int:
    """LLaMA decoder + lm_head: q,k,v,o (no bias), gate/up/down, 2 RMSNorms per layer, final norm."""
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    return vocab * h + layers * per_layer + h + vocab * h


def clip_vit_l14_224() -> int:
    """CLIP ViT-L/14 vision model at 224 px (HF CLIPVisionModel, incl. pre/post layer norms)."""
    d, mlp, layers, patches = 1024, 4096, 24, (224 // 14) ** 2
    embeddings = d + 3 * 14 * 14 * d + (patches + 1) * d  # class token, patch conv (no bias), positions
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * mlp + mlp) + (mlp * d + d)
    return embeddings + 2 * d + layers * per_layer + 2 * d


def sam_vit_h_image_encoder() -> int:
    d, depth, heads, window, grid, mlp, out = 1280, 32, 16, 14, 64, 5120, 256
    head_dim = d // heads
    total = 3 * 16 * 16 * d + d + grid * grid * d  # patch embed conv + abs pos
    for i in range(depth):
        size = grid if i in (7, 15, 23, 31) else window
        total += 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (2 * size - 1) * head_dim
        total += 2 * d + (d * mlp + mlp) + (mlp * d + d)
    return total + d * out + 2 * out + out * out * 9 + 2 * out  # neck


def sam_prompt_encoder() -> int:
    d = 256
    return 4 * d + d + (1 * 4 * 4 + 4) + 2 * 4 + (4 * 16 * 4 + 16) + 2 * 16 + (16 * d + d) + d


def sam_mask_decoder() -> int:
    d, mlp, half = 256, 2048, 128

    def attn(inner: int) -> int:
        return 3 * (d * inner + inner) + inner * d + d

    layer = attn(d) + 2 * d + attn(half) + 2 * d + (d * mlp + mlp) + (mlp * d + d) + 2 * d + 2 * d + attn(half)
    transformer = 2 * layer + attn(half) + 2 * d
    upscaling = (d * 64 * 4 + 64) + 2 * 64 + (64 * 32 * 4 + 32)
    hyper = 4 * ((d * d + d) * 2 + d * 32 + 32)
    iou_head = (d * d + d) * 2 + d * 4 + 4
    return transformer + d + 4 * d + upscaling + hyper + iou_head


@pytest.mark.parametrize("name,h,inter,layers,lora_r", [("gsva-7b", 4096, 11008, 32, 8),
                                                         ("gsva-13b", 5120, 13824, 40, 64)])
def test_large_presets_match_published_architecture(name, h, inter, layers, lora_r):
    counts = parameter_counts(preset(name))
    vocab = 32000 + 4 + 1  # Llama + [SEG] [REJ] <im_start> <im_end> + our <image> row
    expected = {
        "llm": llama(vocab, h, inter, layers),
        "vision_tower": clip_vit_l14_224(),
        "projector": 1024 * h + h,
        "sam_image_encoder": sam_vit_h_image_encoder(),
        "sam_prompt_encoder": sam_prompt_encoder(),
        "sam_mask_decoder": sam_mask_decoder(),
        "text_hidden_fcs": (h * h + h) + (h * 256 + 256),
    }
    expected["total"] = sum(expected.values())
    lora = layers * 2 * lora_r * (h + h)  # q_proj and v_proj: A (r x H) + B (H x r)
    expected["trainable"] = 2 * vocab * h + lora + expected["sam_mask_decoder"] + expected["text_hidden_fcs"]
    assert counts == expected
    # Cross-check with the published totals: LLaMA-7B 6,738,415,616 / LLaMA-2-13B 13,015,864,320 (32000
    # tokens), CLIP ViT-L/14 vision 303,179,776, SAM ViT-H 641,090,608.
    llama_published = {"gsva-7b": 6_738_415_616, "gsva-13b": 13_015_864_320}[name]
    assert counts["llm"] - 2 * (vocab - 32000) * h == llama_published
    assert counts["vision_tower"] == 303_179_776
    assert counts["sam_image_encoder"] + counts["sam_prompt_encoder"] + counts["sam_mask_decoder"] == 641_090_608


def test_small_presets_sizes_and_describe_cli(capsys):
    shapes = parameter_counts(preset("shapes"))
    assert 5_000_000 <= shapes["total"] <= 10_000_000
    assert preset("shapes").sam.low_res_mask_size == 64 and preset("shapes").sam.image_size == 128
    assert gsva_main(["describe", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["total"] == sum(v for k, v in out["parameters"].items() if k not in ("total", "trainable"))
    assert GSVAConfig.from_dict(out["config"]) == preset("tiny")


def test_config_validation_and_unknown_preset():
    with pytest.raises(ValueError, match="num_heads"):
        preset("tiny").replace(llm=preset("tiny").llm.__class__(vocab_size=512, hidden_size=63, intermediate_size=8,
                                                                  num_layers=1, num_heads=4))
    with pytest.raises(KeyError, match="known presets"):
        preset("gsva-70b")
    assert set(PRESETS) >= {"tiny", "shapes", "gsva-7b", "gsva-13b"}


# ------------------------------------------------------------------------------------ tokens / prompts
def test_tokenizer_layout_and_safe_lookup():
    cfg = preset("tiny")
    tok = build_builtin_tokenizer(cfg)
    ids = check_tokenizer(tok, cfg)
    assert ids == token_ids(cfg) and (ids.seg, ids.image) == (507, 511) and (ids.unk, ids.bos, ids.eos) == (0, 1, 2)
    encoded, _ = tok.encode("a:[SEG], b:[REJ]", add_bos=False)
    assert encoded.count(ids.seg) == 1 and encoded.count(ids.rej) == 1
    assert encoded[0] != ids.seg  # never take the id from position 0 of an encoding (LISA #55)
    with pytest.raises(KeyError, match="not in the tokenizer"):
        tok.token_id("[NOPE]")
    with pytest.raises(ValueError, match="rows"):
        check_tokenizer(tok, preset("shapes"))
    assert build_builtin_tokenizer(cfg).to_json() == tok.to_json()  # deterministic


# ------------------------------------------------------------------------------- [SEG] hidden-state rule
def test_seg_prompt_is_hidden_state_before_each_seg():
    seg = 7
    ids = torch.tensor([[1, 5, seg, 6, 6, seg, 2], [0, 0, 1, 4, 4, 4, seg]])
    rows, cols = seg_prompt_positions(ids, seg)
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [1, 4, 5]
    with pytest.raises(ValueError, match="position 0"):
        seg_prompt_positions(torch.tensor([[seg, 1]]), seg)


def test_forward_masks_come_from_the_position_before_seg():
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    tok = build_builtin_tokenizer(cfg)
    ids = model.token_ids
    names = ["a", "b", "c"]
    encs = []
    for rejected in ([False, True, False], [True, False, True]):
        encs.append(prompts.encode_eval(tok, ids, names, rejected, cfg))
    batch = prompts.collate(encs, ids.pad)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    images = prepare_images([rgb, rgb[:30]], cfg)
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, images.clip_pixels, images.sam_pixels, torch.tensor([0, 1]))
        tokens, embeddings = model.encode_images(images.clip_pixels, images.sam_pixels)
        L = cfg.sam.low_res_mask_size
        assert out.logits.shape == (2, batch.input_ids.shape[1], cfg.llm.vocab_size)
        assert out.mask_logits.shape == (3, L, L) and embeddings.shape[-1] == cfg.sam.embedding_size
        seg_cols = (batch.input_ids == ids.seg).nonzero(as_tuple=True)[1]
        assert torch.equal(out.mask_cols, seg_cols - 1)
        before = model.decode_masks(out.hidden[out.mask_rows, out.mask_cols], embeddings, out.mask_rows)
        at = model.decode_masks(out.hidden[out.mask_rows, seg_cols], embeddings, out.mask_rows)
    torch.testing.assert_close(out.mask_logits, before)
    assert not torch.allclose(out.mask_logits, at)
    # the second image's masks use its own embedding: same prompt on image 0 differs
    with torch.no_grad():
        prompts_ = out.hidden[out.mask_rows, out.mask_cols]
        other = model.decode_masks(prompts_, embeddings, torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(other[1:], out.mask_logits[1:])


# ------------------------------------------------------------------------------------------- transforms
def test_sam_preprocessing_matches_segment_anything_and_masks_return_to_original_size():
    from segment_anything.utils.transforms import ResizeLongestSide

    from gsva.transforms import masks_to_original, resized_shape, sam_input

    cfg = preset("shapes").sam
    rgb = np.random.default_rng(0).integers(0, 256, (97, 151, 3), dtype=np.uint8)
    x, (h, w) = sam_input(rgb, cfg)
    reference = torch.from_numpy(ResizeLongestSide(cfg.image_size).apply_image(rgb)).permute(2, 0, 1).float()
    assert (h, w) == tuple(reference.shape[1:]) == resized_shape(97, 151, cfg.image_size) == (82, 128)
    mean, std = torch.tensor(cfg.pixel_mean).view(3, 1, 1), torch.tensor(cfg.pixel_std).view(3, 1, 1)
    torch.testing.assert_close(x[:, :h, :w], (reference - mean) / std)
    assert x.shape == (3, 128, 128) and not x[:, h:].any() and not x[:, :, w:].any()
    low = torch.zeros(1, cfg.low_res_mask_size, cfg.low_res_mask_size)
    low[0, :20, :] = 5.0  # low-res rows 0-19 = SAM rows 0-39 = original rows 0-47 (scale 97/82)
    full = masks_to_original(low, (h, w), (97, 151), cfg.image_size)
    assert full.shape == (1, 97, 151)
    assert (full[0, :45] > 0).all() and (full[0, 50:] <= 0).all()
