"""The GSVA module: composes an already-built Llava MLLM, SAM and ``text_hidden_fcs``.

Tensors in, tensors out: tokenising, resizing and post-processing live in gsva.prompts / gsva.transforms /
gsva.predictor, losses in gsva.losses. The device and dtype come from the parameters.

The mask prompt of each ``[SEG]`` is the final (post-norm) LLM hidden state at the position just BEFORE
it (the position whose logits predict ``[SEG]``), projected by ``text_hidden_fcs`` to SAM's prompt width
and given to the mask decoder as its single sparse prompt token, with the ``no_mask_embed`` dense prompt,
``multimask_output=False``. Each image's SAM embedding is computed once and shared by all its ``[SEG]``s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gsva.config import GSVAConfig
from gsva.tokens import TokenIds

# SAM's random-Fourier positional encoding multiplies a float32 grid by this buffer; stock SAM fails if
# the buffer follows the model to float64/bfloat16, so it always stays float32 (its output is cast).
FLOAT32_BUFFERS = ("sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",)


@dataclass
class GSVAOutput:
    """``logits`` (B, T, V); ``mask_logits`` (M, L, L) low-res, one per [SEG] in row-major order of
    (``mask_rows``, ``mask_cols``) = (conversation, prompt position); ``hidden`` (B, T, H)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    mask_logits: torch.Tensor
    mask_rows: torch.Tensor
    mask_cols: torch.Tensor


def seg_prompt_positions(input_ids: torch.Tensor, seg_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions just before each [SEG] token in (B, T) ids, row-major order."""
    rows, cols = (input_ids == seg_id).nonzero(as_tuple=True)
    if (cols == 0).any():
        raise ValueError("a [SEG] token at position 0 has no preceding position to read its prompt from")
    return rows, cols - 1


def positions_from_mask(attention_mask: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions that count only real tokens (left padding / holes get the previous position).
    ``past``: (B,) real tokens already in the cache."""
    pos = attention_mask.long().cumsum(-1) - 1
    if past is not None:
        pos = pos + past[:, None]
    return pos.clamp(min=0)


class GSVA(nn.Module):
    def __init__(self, cfg: GSVAConfig, mllm: nn.Module, sam: nn.Module, text_hidden_fcs: nn.Module,
                 token_ids: TokenIds):
        super().__init__()
        self.cfg = cfg
        self.token_ids = token_ids
        self.mllm = mllm  # transformers LlavaForConditionalGeneration (projector = one Linear)
        self.sam = sam  # segment_anything Sam; only its image_encoder / prompt_encoder / mask_decoder run
        self.text_hidden_fcs = text_hidden_fcs

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` ... except FLOAT32_BUFFERS, which stay float32."""
        super()._apply(fn, recurse)
        pe = self.sam.prompt_encoder.pe_layer
        pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
        return self

    # ---------------------------------------------------------------------------------------------- parts
    @property
    def language_model(self) -> nn.Module:
        return self.mllm.model.language_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_images(self, clip_pixels: torch.Tensor, sam_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, C, C), (N, 3, S, S) -> projected CLIP tokens (N, P, H), SAM embeddings (N, D, g, g).
        Frozen encoders run without autograd."""
        return self.encode_clip(clip_pixels), self.encode_sam(sam_pixels)

    def encode_clip(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, C, C) -> projected CLIP tokens (N, P, H) (no autograd when CLIP and projector are frozen)."""
        clip = self.mllm.model.vision_tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(clip, self.mllm.model.multi_modal_projector)):
            feats = self.mllm.model.get_image_features(pixel_values=clip_pixels.to(self.dtype)).pooler_output
            return torch.stack(list(feats))

    def encode_sam(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> SAM image embeddings (N, D, g, g) (no autograd when the encoder is frozen)."""
        encoder = self.sam.image_encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(encoder)):
            return encoder(sam_pixels.to(self.dtype))

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's <image> placeholders replaced by its (P, H) image tokens."""
        embeds = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.token_ids.image
        counts = is_image.sum(-1)
        expected = image_tokens.shape[1]
        bad = (counts != expected).nonzero(as_tuple=True)[0]
        if len(bad):
            raise ValueError(f"conversation {int(bad[0])} has {int(counts[bad[0]])} <image> tokens, the vision "
                             f"tower gives {expected}")
        return embeds.masked_scatter(is_image[..., None], image_tokens.to(embeds.dtype))

    def language(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache=None, use_cache: bool = False):
        """LLM over embeddings -> (final post-norm hidden (B, T, H), logits (B, T, V), cache)."""
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache)
        hidden = out.last_hidden_state
        return hidden, self.mllm.lm_head(hidden), out.cache

    def decode_masks(self, prompt_hidden: torch.Tensor, image_embeddings: torch.Tensor,
                     image_index: torch.Tensor) -> torch.Tensor:
        """(M, H) hidden states before [SEG]s -> (M, L, L) low-res mask logits; ``image_index`` (M,) picks
        each prompt's image. One decoder call per image with all its prompts batched."""
        size = self.cfg.sam.low_res_mask_size
        out = prompt_hidden.new_zeros((prompt_hidden.shape[0], size, size))
        if prompt_hidden.shape[0] == 0:
            return out
        prompts = self.text_hidden_fcs(prompt_hidden)  # (M, D)
        pe = self.sam.prompt_encoder.get_dense_pe().to(prompts.dtype)
        _, dense = self.sam.prompt_encoder(points=None, boxes=None, masks=None)  # no_mask_embed, (1, D, g, g)
        results = []
        for n in image_index.unique().tolist():
            sel = (image_index == n).nonzero(as_tuple=True)[0]
            masks, _ = self.sam.mask_decoder(
                image_embeddings=image_embeddings[n : n + 1], image_pe=pe,
                sparse_prompt_embeddings=prompts[sel][:, None, :], dense_prompt_embeddings=dense.to(prompts.dtype),
                multimask_output=False,
            )
            results.append((sel, masks[:, 0]))
        return out.index_put((torch.cat([s for s, _ in results]),), torch.cat([m for _, m in results]).to(out.dtype))

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, clip_pixels: torch.Tensor,
                sam_pixels: torch.Tensor, conv_image: torch.Tensor) -> GSVAOutput:
        """One pass over B conversations (B, T) about N images; ``conv_image`` (B,) maps conversation ->
        image. Returns logits and one low-res mask per [SEG] token present in ``input_ids``."""
        image_tokens, image_embeddings = self.encode_images(clip_pixels, sam_pixels)
        embeds = self.embed(input_ids, image_tokens[conv_image])
        hidden, logits, _ = self.language(embeds, attention_mask, positions_from_mask(attention_mask))
        rows, cols = seg_prompt_positions(input_ids, self.token_ids.seg)
        masks = self.decode_masks(hidden[rows, cols], image_embeddings, conv_image[rows])
        return GSVAOutput(logits=logits, hidden=hidden, mask_logits=masks, mask_rows=rows, mask_cols=cols)


def _trains(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())
