"""`python -m jobs.train`: fine-tune GSVA on task shards with Ray Train (see README, "Training").

Examples:
  # the shipped Shapes-GRES model (trained from scratch, every parameter)
  python -m jobs.train --data data/shapes-gres/tasks --val-data data/shapes-gres/tasks --preset shapes \\
      --output outputs/train/shapes-gres --export checkpoints/shapes-gres --export-dtype float16 ...
  # gRefCOCO from the official 7B release, LoRA r=8, 8 GPUs
  python -m jobs.train --data s3://bucket/grefcoco/tasks --preset gsva-7b --init s3://bucket/gsva-7b-pt.bin \\
      --llava s3://bucket/LLaVA-Lightning-7B-v1-1 --clip s3://bucket/clip-vit-large-patch14 \\
      --sam s3://bucket/sam_vit_h_4b8939.pth --workers 8 --gpus-per-worker 1 --batch-size 20 \\
      --max-steps 5000 --output s3://bucket/runs/gsva-7b-gres
  # the bases GSVA starts from, then GSVA's recipe on them (see README, "The shipped model")
  python -m jobs.train --stage clip --objects data/shapes4k/tasks/raw/instances.json --preset shapes ...
  python -m jobs.train --stage sam --objects data/shapes4k/tasks/raw/instances.json --preset shapes ...
  python -m jobs.train --stage llava --objects data/shapes4k/tasks/raw/instances.json --preset shapes ...
  python -m jobs.train --sam-base checkpoints/shapes-sam-base --llava-base checkpoints/shapes-llava-base ...
  # continue a stopped run (same --output)
  python -m jobs.train ... --output s3://bucket/runs/gsva-7b-gres --resume --max-steps 6000
"""

from __future__ import annotations

import argparse
import json
import sys

from gsva.config import DTYPES, POLICIES
from gsva.losses import LossConfig
from pipeline.storage import StorageError, StorageOptions
from pipeline.train.config import (
    PRECISIONS,
    STAGES,
    STRATEGIES,
    InitSpec,
    OptimConfig,
    ScalingSpec,
    TrainConfig,
    TrainConfigError,
)

EXIT_FAILED, EXIT_REFUSED = 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and storage")
    io.add_argument("--data", required=True, help="task shards folder (local, file://, s3://); its train split")
    io.add_argument("--output", required=True, help="run folder: checkpoints step-N/, training curve, history")
    io.add_argument("--val-data", help="task shards folder whose val split is scored during training")
    io.add_argument("--val-max-images", type=int, default=TrainConfig.val_max_images,
                    help="validate on the first N val images (default: %(default)s)")
    io.add_argument("--export", help="also write the final model here, in our checkpoint format (LoRA merged)")
    io.add_argument("--export-dtype", choices=DTYPES, default=TrainConfig.export_dtype,
                    help="storage dtype of --export (default: %(default)s)")
    io.add_argument("--s3-endpoint", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS default)")
    io.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")

    model = p.add_argument_group("model")
    model.add_argument("--stage", choices=STAGES, default=TrainConfig.stage,
                       help="gsva: GSVA fine-tuning; clip / sam / llava: pretrain CLIP, the SAM base, the LLaVA base "
                       "(default: %(default)s)")
    model.add_argument("--objects", help="with --stage clip|sam|llava: the dataset's COCO instances.json "
                       "(every object)")
    model.add_argument("--dense-weight", type=float, default=TrainConfig.dense_weight,
                       help="with --stage sam: also train every cell of SAM's image embedding to predict the class "
                       "and box of the object covering it, at this weight (the stand-in for real SAM's rich "
                       "features; default: %(default)s, SAM's loss alone)")
    model.add_argument("--sam-base", help="start GSVA from this SAM base (our format; its sam.* weights) ...")
    model.add_argument("--llava-base", help="... and this LLaVA base (everything else, and the tokenizer)")
    model.add_argument("--seg-words", nargs="+", default=(), metavar="WORD",
                       help="start [SEG]'s embedding and lm_head rows as the mean of these words' (first tokens') "
                       "rows, e.g. the positions a LLaVA base answers for a present phrase (default: GSVA's new "
                       "random rows)")
    model.add_argument("--rej-words", nargs="+", default=(), metavar="WORD",
                       help="... and [REJ]'s, e.g. the word it answers for an absent one (none)")
    model.add_argument("--preset", help="gsva.config preset: tiny, shapes, gsva-7b, gsva-13b")
    model.add_argument("--init", help="start from our checkpoint (folder) or the official GSVA .bin")
    model.add_argument("--llava", help="with an official --init: the LLaVA model folder (weights + tokenizer)")
    model.add_argument("--clip", help="with an official --init: CLIP ViT-L/14 weights")
    model.add_argument("--sam", help="with an official --init: sam_vit_h_4b8939.pth")
    trainable = model.add_mutually_exclusive_group()
    trainable.add_argument("--lora-r", type=int, help="LoRA rank on q/v (default: the preset's, 8 for 7B, 64 for "
                           "13B); LoRA is the default when starting from --init")
    trainable.add_argument("--full", action="store_true", help="train every parameter (the default from a "
                           "random init, i.e. --preset without --init); same as --policy all")
    trainable.add_argument("--policy", choices=POLICIES, help="trainable parameters: lora (LoRA on q/v + lm_head, "
                           "embed_tokens, mask decoder, text_hidden_fcs), llm (the whole LLM instead of LoRA), "
                           "llm-sam (llm and SAM's image encoder: for a SAM base weaker than SAM ViT-H), all; "
                           "clip / sam / projector / mllm (the clip / sam / llava stages; default clip / sam / mllm "
                           "there)")
    model.add_argument("--max-expressions", type=int, help="K: expressions per sample, at most (default: the "
                       "model's max_expressions_per_prompt)")
    model.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations "
                       "(official for 7B/13B)")

    opt = p.add_argument_group("optimisation (defaults: GSVA's recipe)")
    opt.add_argument("--max-steps", type=int, required=True)
    opt.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                     help="samples per worker per step (default: %(default)s)")
    opt.add_argument("--lr", type=float, default=OptimConfig.lr, help="peak lr (default: %(default)s)")
    opt.add_argument("--warmup-steps", type=int, default=OptimConfig.warmup_steps)
    opt.add_argument("--weight-decay", type=float, default=OptimConfig.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=OptimConfig.grad_clip)
    opt.add_argument("--ce-weight", type=float, default=LossConfig.ce_weight, help="(default: %(default)s)")
    opt.add_argument("--bce-weight", type=float, default=LossConfig.bce_weight, help="(default: %(default)s)")
    opt.add_argument("--dice-weight", type=float, default=LossConfig.dice_weight, help="(default: %(default)s)")
    opt.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                     help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    opt.add_argument("--seed", type=int, default=TrainConfig.seed)
    opt.add_argument("--shuffle-buffer", type=int, default=TrainConfig.shuffle_buffer,
                     help="images in each worker's local shuffle buffer (default: %(default)s)")
    opt.add_argument("--cache-data", action="store_true",
                     help="read and decode the train and val splits once and keep them in Ray's object store "
                          "(splits that fit in memory and train for many epochs); default: stream, decode every epoch")

    run = p.add_argument_group("checkpoints, validation, reports")
    run.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    run.add_argument("--keep-checkpoints", type=int, default=TrainConfig.keep_checkpoints,
                     help="how many of the latest checkpoints to keep (default: %(default)s)")
    run.add_argument("--val-every", type=int, help="validate every N steps (default: at every checkpoint)")
    run.add_argument("--report-every", type=int, default=TrainConfig.report_every,
                     help="report loss parts, lr and samples/s every N steps (default: %(default)s)")

    scale = p.add_argument_group("scaling")
    scale.add_argument("--workers", type=int, default=ScalingSpec.workers, help="Ray Train workers")
    scale.add_argument("--gpus-per-worker", type=float, default=ScalingSpec.gpus_per_worker,
                       help="0: CPU workers with gloo; >0: GPUs with NCCL")
    scale.add_argument("--cpus-per-worker", type=float, default=ScalingSpec.cpus_per_worker)
    scale.add_argument("--threads-per-worker", type=int, help="torch threads (default: --cpus-per-worker)")
    scale.add_argument("--strategy", choices=STRATEGIES, default=ScalingSpec.strategy,
                       help="ddp: replicate the model; fsdp: shard it (7B full fine-tuning, 13B)")
    scale.add_argument("--max-failures", type=int, default=ScalingSpec.max_failures,
                       help="worker-group restarts from the latest checkpoint before the run fails")
    scale.add_argument("--worker-resources", help='custom Ray resources per worker, JSON, e.g. \'{"gpu_node": 1}\': '
                                                  "workers run only on nodes that offer them")
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    from pipeline.ray_runtime import parse_resources

    try:
        resources = parse_resources(args.worker_resources, "--worker-resources")
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None
    return TrainConfig(
        data=args.data, output=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
        init=InitSpec(preset=args.preset, checkpoint=args.init, llava=args.llava, clip=args.clip, sam=args.sam,
                      sam_base=args.sam_base, llava_base=args.llava_base,
                      seg_words=tuple(args.seg_words), rej_words=tuple(args.rej_words)),
        stage=args.stage, objects=args.objects, dense_weight=args.dense_weight,
        max_expressions=args.max_expressions, policy="all" if args.full else args.policy, lora_r=args.lora_r,
        optim=OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                          grad_clip=args.grad_clip),
        loss=LossConfig(ce_weight=args.ce_weight, bce_weight=args.bce_weight, dice_weight=args.dice_weight),
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, val_data=args.val_data,
        val_every=args.val_every, val_max_images=args.val_max_images, report_every=args.report_every,
        shuffle_buffer=args.shuffle_buffer, cache_data=args.cache_data, seed=args.seed, resume=args.resume,
        scaling=ScalingSpec(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                            cpus_per_worker=args.cpus_per_worker, threads_per_worker=args.threads_per_worker,
                            strategy=args.strategy, max_failures=args.max_failures, worker_resources=resources),
        export=args.export, export_dtype=args.export_dtype, storage=StorageOptions(s3_endpoint=args.s3_endpoint),
    ).validate()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
    except TrainConfigError as exc:
        parser.error(str(exc))

    from pipeline.train.launch import run

    try:
        result = run(cfg)
    except (TrainConfigError, StorageError, FileNotFoundError) as exc:
        print(f"train refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends: one clear line
        print(f"train failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"checkpoint": result.checkpoint, "export": result.export,
                      "final": {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
