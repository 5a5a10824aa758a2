"""Config -> modules. No file I/O, no weights: loading is a separate step (gsva.checkpoint, gsva.official).

The MLLM is transformers' ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama) whose stock
Linear-GELU-Linear projector is replaced by GSVA's single ``Linear(vision_hidden -> H)``; SAM is the
unmodified ``segment_anything`` ImageEncoderViT / PromptEncoder / MaskDecoder / TwoWayTransformer sized
from the config. Build on the meta device (``with torch.device("meta")``) to count parameters for free.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from gsva.config import GSVAConfig, LLMConfig, SAMConfig, VisionConfig

# Token ids the HF configs need at build time. The tokenizers of this project put <unk>, <s>, </s>
# at 0, 1, 2 exactly as Llama's does (gsva.tokens checks it), so they are fixed here.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def llava_config(cfg: GSVAConfig, image_token_id: int):
    """The transformers LlavaConfig for this model (vision feature layer -2, CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    llm: LLMConfig = cfg.llm
    vis: VisionConfig = cfg.vision
    text_config = LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_heads, max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        pad_token_id=UNK_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
        num_hidden_layers=vis.num_layers, num_attention_heads=vis.num_heads, image_size=vis.image_size,
        patch_size=vis.patch_size, hidden_act="quick_gelu", layer_norm_eps=vis.layer_norm_eps,
    )
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=vis.num_image_tokens, vision_feature_layer=vis.feature_layer,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def build_mllm(cfg: GSVAConfig, image_token_id: int) -> nn.Module:
    """LlavaForConditionalGeneration with GSVA's projector: ONE Linear, no activation."""
    from transformers import LlavaForConditionalGeneration

    mllm = LlavaForConditionalGeneration(llava_config(cfg, image_token_id))
    mllm.model.multi_modal_projector = nn.Linear(cfg.vision.hidden_size, cfg.llm.hidden_size)
    return mllm


def build_sam(cfg: SAMConfig) -> nn.Module:
    """Stock segment_anything Sam (encoders + decoder) from config sizes, as build_sam.py does for ViT-H."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = cfg.embedding_size
    image_encoder = ImageEncoderViT(
        depth=cfg.encoder_depth, embed_dim=cfg.encoder_dim, img_size=cfg.image_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_heads, patch_size=cfg.patch_size,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(cfg.global_attn_indexes),
        window_size=cfg.window_size, out_chans=cfg.prompt_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                      mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
        transformer_dim=cfg.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std))


def build_text_hidden_fcs(hidden_size: int, prompt_dim: int) -> nn.Module:
    """Linear(H, H) -> ReLU -> Linear(H, prompt_dim) -> Dropout(0), keyed text_hidden_fcs.0.0 / .0.2."""
    return nn.Sequential(nn.Sequential(
        nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, prompt_dim), nn.Dropout(0.0),
    ))


def build_model(cfg: GSVAConfig, seed: int | None = None):
    """The composed GSVA module with random weights. Token ids come from the config's canonical vocabulary
    layout (gsva.tokens.token_ids); tokenizers are checked against it when paired with a model.
    Random init is seeded by ``seed`` (default cfg.seed) without touching the global RNG."""
    from gsva.modeling import GSVA
    from gsva.tokens import token_ids

    ids = token_ids(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        mllm = build_mllm(cfg, ids.image)
        sam = build_sam(cfg.sam)
        fcs = build_text_hidden_fcs(cfg.llm.hidden_size, cfg.sam.prompt_dim)
    return GSVA(cfg, mllm=mllm, sam=sam, text_hidden_fcs=fcs, token_ids=ids)
