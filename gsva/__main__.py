"""``python -m gsva describe PRESET_OR_CHECKPOINT_URI`` and ``python -m gsva convert ...``.

describe: JSON with the config and parameter counts per part, counted on a model built on the meta
device (no memory, seconds even for 13B); ``trainable`` is under the default fine-tuning policy ("lora"),
so it includes the LoRA adapters that policy adds (``total`` is the model without them).
convert: official GSVA release (GSVA .bin + LLaVA folder + CLIP + SAM) -> our checkpoint format.
"""

from __future__ import annotations

import argparse
import json
import sys

from gsva.config import DTYPES
from gsva.meta import load_config
from gsva.storage import StorageOptions

PARTS = ("llm", "vision_tower", "projector", "sam_image_encoder", "sam_prompt_encoder", "sam_mask_decoder",
         "text_hidden_fcs")


def parameter_counts(cfg) -> dict[str, int]:
    """Per-part parameter counts on the meta device, plus total and trainable (policy "lora")."""
    import torch

    from gsva.builder import build_model
    from gsva.freeze import freeze

    with torch.device("meta"):
        model = build_model(cfg)
        parts = {
            "llm": [model.language_model, model.mllm.lm_head],
            "vision_tower": [model.mllm.model.vision_tower],
            "projector": [model.mllm.model.multi_modal_projector],
            "sam_image_encoder": [model.sam.image_encoder],
            "sam_prompt_encoder": [model.sam.prompt_encoder],
            "sam_mask_decoder": [model.sam.mask_decoder],
            "text_hidden_fcs": [model.text_hidden_fcs],
        }
        counts = {name: sum(p.numel() for m in mods for p in m.parameters()) for name, mods in parts.items()}
        counts["total"] = sum(p.numel() for p in model.parameters())
        counts["trainable"] = freeze(model, "lora")["trainable"]
    return counts


def describe(uri_or_preset: str, storage=None) -> dict:
    cfg = load_config(uri_or_preset, storage)
    return {"source": uri_or_preset, "config": cfg.to_dict(), "trainable_policy": "lora",
            "parameters": parameter_counts(cfg)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsva", description=__doc__.split("\n")[0])
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="config and parameter counts as JSON")
    d.add_argument("source", help="preset name or checkpoint URI")
    c = sub.add_parser("convert", help="official GSVA release -> our checkpoint")
    c.add_argument("--preset", required=True, choices=("gsva-7b", "gsva-13b", "tiny", "shapes"))
    c.add_argument("--gsva", required=True, help="gsva-*.bin")
    c.add_argument("--llava", required=True, help="LLaVA model folder (weights + tokenizer)")
    c.add_argument("--clip", default=None, help="CLIP ViT-L/14 weights (file or folder)")
    c.add_argument("--sam", default=None, help="sam_vit_h_4b8939.pth")
    c.add_argument("--output", required=True, help="checkpoint URI to write")
    c.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="storage dtype of the weights")
    args = parser.parse_args(argv)

    storage = StorageOptions(s3_endpoint=args.s3_endpoint)
    if args.command == "describe":
        print(json.dumps(describe(args.source, storage), indent=2))
        return 0
    import torch

    from gsva.checkpoint import save_checkpoint
    from gsva.config import preset
    from gsva.official import load_official

    dtype = getattr(torch, args.dtype)
    model, tokenizer, report = load_official(preset(args.preset), args.gsva, args.llava, args.clip, args.sam,
                                             storage, dtype=dtype)
    digest = save_checkpoint(model, tokenizer, args.output, storage, dtype=dtype)
    print(json.dumps({"output": args.output, "sha256": digest, "sources": report.sources,
                      "merged_lora_modules": len(report.merged_lora), "added_vocab_rows": report.added_vocab_rows,
                      "ignored_keys": report.ignored, "unexpected_keys": report.unexpected}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
