"""Which parameters train: a policy applied by the train job, not a side effect of construction.

Policies:
- ``"lora"`` (GSVA default): LoRA (peft) on the LLM's q_proj/v_proj with the config's r/alpha/dropout,
  plus full ``lm_head``, ``embed_tokens``, SAM ``mask_decoder`` and ``text_hidden_fcs``. CLIP, the
  projector and SAM's image/prompt encoders stay frozen.
- ``"llm"``: as official ``lora_r < 0``: the whole LLM instead of LoRA, same other parts.
- ``"all"``: every parameter (training a preset from scratch, e.g. Shapes-GRES ``--full``).
"""

from __future__ import annotations

from torch import nn

from gsva.config import POLICIES, LoRAConfig
from gsva.lora import apply_lora, has_lora


def freeze(model: nn.Module, policy: str, lora: LoRAConfig | None = None) -> dict[str, int]:
    """Apply a trainable policy; returns {"trainable": n, "total": n} parameter counts."""
    if policy not in POLICIES:
        raise ValueError(f"trainable policy must be one of {POLICIES}, not {policy!r}")
    if policy == "lora" and not has_lora(model):
        apply_lora(model, lora or model.cfg.lora)
    for p in model.parameters():
        p.requires_grad_(policy == "all")
    if policy != "all":
        parts: list[nn.Module] = [model.mllm.lm_head, model.language_model.embed_tokens,
                                  model.sam.mask_decoder, model.text_hidden_fcs]
        if policy == "llm":
            parts.append(model.language_model)
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(True)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    return count(model)


def count(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
