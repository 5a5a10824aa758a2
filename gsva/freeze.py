"""Which parameters train: a policy applied by the train job, not a side effect of construction.

Policies:
- ``"lora"`` (GSVA default): LoRA (peft) on the LLM's q_proj/v_proj with the config's r/alpha/dropout,
  plus full ``lm_head``, ``embed_tokens``, SAM ``mask_decoder`` and ``text_hidden_fcs``. CLIP, the
  projector and SAM's image/prompt encoders stay frozen.
- ``"llm"``: as official ``lora_r < 0``: the whole LLM instead of LoRA, same other parts.
- ``"llm-sam"``: as ``"llm"``, and SAM's image encoder trains too. Not GSVA's recipe: it is for a SAM base
  weaker than SAM ViT-H, whose frozen features a mask decoder cannot match an expression against (the
  Shapes-GRES model, README "The shipped Shapes-GRES model").
- ``"all"``: every parameter (training a preset from scratch, e.g. Shapes-GRES ``--full``).

Pretraining policies (the bases GSVA starts from, see pipeline.train.stages):
- ``"clip"``: CLIP's vision tower (the stand-in for CLIP's own pretraining).
- ``"sam"``: SAM's image encoder, prompt encoder and mask decoder (SAM's own promptable segmentation).
- ``"projector"``: the projector (LLaVA stage 1; CLIP frozen).
- ``"mllm"``: the projector and the whole LLM with ``embed_tokens`` and ``lm_head`` (LLaVA stage 2; CLIP
  frozen, as in LLaVA).
"""

from __future__ import annotations

from torch import nn

from gsva.config import POLICIES, LoRAConfig
from gsva.lora import apply_lora, has_lora

#: GSVA's fine-tuning policies: the official trained parts, with LoRA or the whole LLM (and SAM's image encoder).
FINE_TUNING = ("lora", "llm", "llm-sam")


def freeze(model: nn.Module, policy: str, lora: LoRAConfig | None = None) -> dict[str, int]:
    """Apply a trainable policy; returns {"trainable": n, "total": n} parameter counts."""
    if policy not in POLICIES:
        raise ValueError(f"trainable policy must be one of {POLICIES}, not {policy!r}")
    if policy == "lora" and not has_lora(model):
        apply_lora(model, lora or model.cfg.lora)
    for p in model.parameters():
        p.requires_grad_(policy == "all")
    for part in trained_parts(model, policy):
        for p in part.parameters():
            p.requires_grad_(True)
    if policy in FINE_TUNING:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    return count(model)


def trained_parts(model: nn.Module, policy: str) -> list[nn.Module]:
    """The modules a policy trains whole (``"all"``: none listed, every parameter trains)."""
    mllm = model.mllm.model
    if policy == "sam":
        return [model.sam.image_encoder, model.sam.prompt_encoder, model.sam.mask_decoder]
    if policy == "clip":
        return [mllm.vision_tower]
    if policy == "projector":
        return [mllm.multi_modal_projector]
    if policy == "mllm":
        return [mllm.multi_modal_projector, model.language_model, model.mllm.lm_head]
    if policy in FINE_TUNING:
        parts = [model.mllm.lm_head, model.language_model.embed_tokens, model.sam.mask_decoder, model.text_hidden_fcs]
        whole_llm = [] if policy == "lora" else [model.language_model]
        sam_encoder = [model.sam.image_encoder] if policy == "llm-sam" else []
        return [*parts, *whole_llm, *sam_encoder]
    return []


def count(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
