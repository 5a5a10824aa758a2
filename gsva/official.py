"""The official GSVA release -> our module names: a declarative key map plus pure functions.

The release is a raw state dict (``gsva-7b-ft-gres.bin`` ...) saved from the PEFT-wrapped model, loaded
officially with ``strict=False`` over LLaVA + CLIP + SAM. Conversion here: take CLIP's ``vision_model.*``,
SAM's ``image_encoder/prompt_encoder/mask_decoder.*``, LLaVA's ``model.*`` / ``lm_head``, then the GSVA
file over them (its ``base_model.model.`` prefix stripped; its ``mm_projector`` wins, since the release
rebuilds the LLaVA one randomly); merge the un-merged LoRA as W += (alpha / r) * B @ A; add the
``<image>`` row to ``embed_tokens`` / ``lm_head`` (the mean row: never an argmax, never read as an input
since image features replace it). Shapes must match exactly, else a loud error lists every mismatch; keys
nobody provides or nobody wants are returned in a ``LoadReport`` for the caller to check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from gsva.checkpoint import assign_weights, empty_model, local_copy, read_state_dict
from gsva.lora import merge_lora
from gsva.tokens import add_gsva_tokens, check_tokenizer, load_pretrained_tokenizer

PEFT_PREFIX = "base_model.model."
LLM = "mllm.model.language_model."
# source -> ((official prefix, our prefix), ...); the first matching prefix wins.
KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    "gsva": (
        ("model.embed_tokens.", LLM + "embed_tokens."),
        ("model.layers.", LLM + "layers."),
        ("model.norm.", LLM + "norm."),
        ("lm_head.", "mllm.lm_head."),
        ("model.mm_projector.", "mllm.model.multi_modal_projector."),
        # transformers 5's CLIPVisionModel has no inner .vision_model: its weights sit directly under it
        ("model.vision_tower.vision_tower.vision_model.", "mllm.model.vision_tower."),
        ("model.visual_model.image_encoder.", "sam.image_encoder."),
        ("model.visual_model.prompt_encoder.", "sam.prompt_encoder."),
        ("model.visual_model.mask_decoder.", "sam.mask_decoder."),
        ("model.text_hidden_fcs.", "text_hidden_fcs."),
    ),
    "clip": (("vision_model.", "mllm.model.vision_tower."),),
    "sam": (
        ("image_encoder.", "sam.image_encoder."),
        ("prompt_encoder.", "sam.prompt_encoder."),
        ("mask_decoder.", "sam.mask_decoder."),
    ),
}
KEY_MAP["llava"] = KEY_MAP["gsva"]  # LLaVA's own checkpoint uses the same names, without the PEFT prefix
# Keys that exist in the sources but have no counterpart, by design (not reported as unexpected).
IGNORED = ("text_model.", "text_projection", "visual_projection", "logit_scale", "rotary_emb.inv_freq",
           "position_ids")
ORDER = ("clip", "sam", "llava", "gsva")  # later sources override earlier ones
VOCAB_KEYS = (LLM + "embed_tokens.weight", "mllm.lm_head.weight")


@dataclass
class LoadReport:
    """What a conversion/load did; the caller decides whether ``missing`` is acceptable."""

    missing: list[str] = field(default_factory=list)  # wanted by the model, given by no source
    unexpected: list[str] = field(default_factory=list)  # given by a source, unknown to the model
    ignored: int = 0  # known-unused source keys (CLIP text tower, rotary buffers...)
    merged_lora: list[str] = field(default_factory=list)  # modules whose LoRA was merged
    added_vocab_rows: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # keys taken from each source

    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def map_key(source: str, key: str) -> str | None:
    """Our name for a source key; None when the key is ignored by design."""
    if source == "gsva" and key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    if any(pattern in key for pattern in IGNORED):
        return None
    for old, new in KEY_MAP[source]:
        if key.startswith(old):
            return new + key[len(old):]
    return "?" + key  # unknown: reported as unexpected


def convert(sources: dict[str, dict[str, torch.Tensor]], expected: dict[str, torch.Size],
            scaling: float) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Official state dicts by source ("clip", "sam", "llava", "gsva"; any may be absent) -> our state dict
    for a model whose (name -> shape) is ``expected``. Raises ValueError on any shape mismatch."""
    report = LoadReport()
    merged: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for source in ORDER:
        taken = 0
        for key, value in sources.get(source, {}).items():
            new = map_key(source, key)
            if new is None:
                report.ignored += 1
                continue
            # every source must fit, even where a later one overrides it (a wrong file is a mistake);
            # vocabularies are checked after merging (LLaVA's may be shorter than GSVA's)
            if new in expected and new not in VOCAB_KEYS and tuple(value.shape) != tuple(expected[new]):
                mismatched.append(f"{source} {key}: {tuple(value.shape)} vs model {new}: {tuple(expected[new])}")
            merged[new] = value
            taken += 1
        report.sources[source] = taken
    report.merged_lora = sorted(k.split(".lora_A.")[0] for k in merged if ".lora_A." in k)
    merged = merge_lora(merged, scaling)
    for key in VOCAB_KEYS:
        if key in merged and key in expected and merged[key].shape[0] + 1 == expected[key][0]:
            rows = merged[key]
            merged[key] = torch.cat([rows, rows.float().mean(0, keepdim=True).to(rows.dtype)])
            report.added_vocab_rows = 1
    mismatched += [f"{k}: {tuple(merged[k].shape)} vs model {tuple(expected[k])}" for k in VOCAB_KEYS
                   if k in merged and k in expected and tuple(merged[k].shape) != tuple(expected[k])]
    if mismatched:
        raise ValueError(f"{len(mismatched)} shape mismatches loading the official checkpoint (wrong preset?):\n  "
                         + "\n  ".join(mismatched))
    report.unexpected = sorted(k.lstrip("?") for k in merged if k not in expected)
    report.missing = sorted(k for k in expected if k not in merged)
    return {k: v for k, v in merged.items() if k in expected}, report


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """(name -> shape) of everything the model's state dict holds (works on meta-device models)."""
    return {k: v.shape for k, v in model.state_dict().items()}


def load_official(cfg, gsva: str, llava: str, clip: str | None = None, sam: str | None = None, storage=None,
                  dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Build ``cfg``'s model from the official release -> (model, tokenizer, LoadReport).

    ``gsva``: the GSVA ``.bin``; ``llava``: the LLaVA model folder (weights + tokenizer); ``clip``: CLIP
    ViT-L/14 weights (file or folder); ``sam``: ``sam_vit_h_4b8939.pth``. Any URI. Fails on shape
    mismatches and on model weights that no source provides; ``report.unexpected`` is for the caller."""
    sources: dict[str, dict[str, torch.Tensor]] = {}
    for name, uri in (("gsva", gsva), ("llava", llava), ("clip", clip), ("sam", sam)):
        if uri is None:
            continue
        with local_copy(uri, storage) as path:
            sources[name] = read_state_dict(path)
            if name == "llava":
                if not os.path.isdir(path):
                    raise ValueError(f"--llava must be the LLaVA model folder (weights and tokenizer), got {uri}")
                tokenizer = add_gsva_tokens(load_pretrained_tokenizer(path), cfg)
    check_tokenizer(tokenizer, cfg)
    model = empty_model(cfg)
    state, report = convert(sources, expected_shapes(model), cfg.lora.scaling)
    if report.missing:
        raise ValueError(f"{len(report.missing)} model weights are in none of the given files, e.g. "
                         f"{report.missing[:8]}: pass --clip/--sam or check the files")
    return assign_weights(model, state, dtype, device), tokenizer, report
