"""LoRA on the GSVA LLM: inject (peft), detect, and merge into plain weights (W + scaling * B @ A).

One home for the adapter math, shared by the trainable policies (`freeze`), our checkpoints (saved merged
or un-merged) and the official release's conversion (un-merged adapters in the ``.bin``).
"""

from __future__ import annotations

import torch
from torch import nn

from gsva.config import LoRAConfig

ADAPTER = "default"  # peft's adapter name: keys ...q_proj.lora_A.default.weight


def apply_lora(model: nn.Module, lora: LoRAConfig) -> None:
    """Inject (un-merged) LoRA layers into the GSVA LLM's target projections, in place."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy; only when adapters are made

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), bias="none")
    inject_adapter_in_model(config, model.language_model, adapter_name=ADAPTER)


def has_lora(model: nn.Module) -> bool:
    return any("lora_A" in name for name, _ in model.named_parameters())


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Merge every ``X.lora_A.<adapter>.weight`` / ``X.lora_B...`` pair into ``X.weight`` (base weight under
    ``X.weight`` or ``X.base_layer.weight``): W + scaling * B @ A, computed in float32. Pure."""
    out = dict(state)
    for key in [k for k in state if ".lora_A." in k]:
        module, rest = key.split(".lora_A.", 1)
        b_key = f"{module}.lora_B.{rest}"
        base_key = next((k for k in (f"{module}.base_layer.weight", f"{module}.weight") if k in state), None)
        if base_key is None or b_key not in state:
            raise KeyError(f"LoRA of {module}: missing {'lora_B' if base_key else 'base weight'}")
        w = state[base_key]
        delta = state[b_key].float() @ state[key].float()
        if delta.shape != w.shape:
            raise ValueError(f"LoRA of {module}: B @ A is {tuple(delta.shape)} but the weight is {tuple(w.shape)}")
        out.pop(key)
        out.pop(b_key)
        out.pop(base_key)
        out[f"{module}.weight"] = (w.float() + scaling * delta).to(w.dtype)
    for key in [k for k in out if ".base_layer." in k]:
        out[key.replace(".base_layer.", ".")] = out.pop(key)
    return out


def merged_state_dict(model: nn.Module, scaling: float) -> dict[str, torch.Tensor]:
    """The model's state dict with LoRA merged under the plain module names."""
    return merge_lora(model.state_dict(), scaling)
