"""``python -m gsva describe PRESET_OR_CHECKPOINT_URI``, ``python -m gsva convert ...`` and ``python -m gsva predict``.

describe: JSON with the config and parameter counts per part, counted on a model built on the meta
device (no memory, seconds even for 13B); ``trainable`` is under the default fine-tuning policy ("lora"),
so it includes the LoRA adapters that policy adds (``total`` is the model without them).
convert: official GSVA release (GSVA .bin + LLaVA folder + CLIP + SAM) -> our checkpoint format.
predict: one image and a few expressions -> one line per expression, OUT/overlay.png and OUT/predictions.json
(gsva.predict; the same predictor call and defaults as the annotate job, so the same masks).
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
    add_predict_parser(sub)
    args = parser.parse_args(argv)

    storage = StorageOptions(s3_endpoint=args.s3_endpoint)
    if args.command == "describe":
        print(json.dumps(describe(args.source, storage), indent=2))
        return 0
    if args.command == "predict":
        return predict(args, storage)
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


def add_predict_parser(sub) -> None:
    from gsva.config import GENERATE, MODES
    from gsva.inputs import EXPRESSIONS_PER_PROMPT, MAX_EXPRESSION_CHARS

    p = sub.add_parser("predict", help="one image, a few expressions: decisions, overlay.png, predictions.json")
    p.add_argument("--checkpoint", required=True, help="checkpoint URI (e.g. checkpoints/shapes-gres) or preset")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("expressions", nargs="+", help="referring expressions, one argument each")
    p.add_argument("--out", default=DEFAULT_PREDICT_OUT, help="folder for overlay.png and predictions.json "
                                                              "(default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default=GENERATE,
                   help="generate: the model decides; teacher-forced: the official benchmark protocol, which "
                        "needs the ground truth (--no-target)")
    p.add_argument("--no-target", default="", help="teacher-forced: comma list of the expression numbers "
                                                   "(1-based) that refer to nothing; the others have targets")
    p.add_argument("--max-expressions-per-prompt", type=int, default=EXPRESSIONS_PER_PROMPT,
                   help="at most N expressions per conversation, as the annotate job (default: all in one, "
                        "the GSVA protocol)")
    p.add_argument("--max-expression-chars", type=int, default=MAX_EXPRESSION_CHARS,
                   help="longer expressions are refused, as by the annotate job (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


DEFAULT_PREDICT_OUT = "outputs/predict"


def parse_no_target(text: str, count: int) -> list[bool]:
    """'2,3' -> [False, True, True] for 3 expressions; ValueError naming a bad number."""
    flags = [False] * count
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not part.isdigit() or not 1 <= int(part) <= count:
            raise ValueError(f"--no-target: {part!r} is not an expression number between 1 and {count}")
        flags[int(part) - 1] = True
    return flags


def predict(args, storage) -> int:
    """Run `python -m gsva predict`; every failure is one line on stderr (exit 2)."""
    from gsva.config import TEACHER_FORCED
    from gsva.images import ImageError
    from gsva.predict import predict_image, read_image, write_outputs
    from gsva.predictor import GSVAPredictor

    try:
        no_target = parse_no_target(args.no_target, len(args.expressions))
        if (args.max_expressions_per_prompt is not None and args.max_expressions_per_prompt < 1) \
                or args.max_expression_chars < 1:
            raise ValueError("--max-expressions-per-prompt and --max-expression-chars must be >= 1")
        image = read_image(args.image)
    except (ValueError, ImageError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    try:
        predictor = GSVAPredictor.from_checkpoint(args.checkpoint, device=args.device, storage=storage)
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"predict: cannot load the model from {args.checkpoint!r}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    answers = predict_image(predictor, image, args.expressions, args.mode,
                            no_target if args.mode == TEACHER_FORCED else None,
                            args.max_expressions_per_prompt, args.max_expression_chars)
    print(f"{args.image}: {image.shape[1]}x{image.shape[0]}, model {predictor.model_id}, mode {args.mode}")
    for n, answer in enumerate(answers):
        print(answer.line(n + 1))
    overlay, predictions = write_outputs(args.out, args.image, image, answers, str(predictor.model_id), args.mode)
    print(f"overlay: {overlay}\npredictions: {predictions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
