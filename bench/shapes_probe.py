"""Where a Shapes-GRES model's masks go wrong: two probes behind the README's "what limits it".

    python bench/shapes_probe.py diagnose --checkpoint checkpoints/shapes-gres --data data/shapes4k/tasks
    python bench/shapes_probe.py oracle --data data/shapes4k/tasks --steps 600
    python bench/shapes_probe.py templates --predictions outputs/eval/generate/predictions \
        --data data/shapes4k/tasks --split test

``diagnose``: teacher-forced masks of a checkpoint on the val split, IoU per Shapes-GRES template, and how
alike the masks of DIFFERENT expressions of one image are (mean pairwise IoU) next to the same figure for
the ground truth. Masks much more alike than the ground truth's mean the mask prompt carries little of
its own expression.

It also asks what the mask prompts KNOW (``prompt_content``): the ``text_hidden_fcs`` output at each
``[SEG]`` (teacher-forced, the evaluation conversation) is classified by nearest centroid (centroids from
half the expressions, accuracy on the other half) into the expression's template, colour and shape. A
prompt that names its template but not its colour or shape cannot pick one object out of several.
``prompt_readout`` asks the same of a linear readout (least squares, same halves), from the mask prompt and
from the LLM hidden state it is projected from, and adds WHERE the target is (row and column of its mask's
centre on a 5 x 5 grid, one-object templates): a prompt can name "the red circle" and still not point at it.
``scales`` compares magnitudes the two towers meet at: projected image tokens vs the LLM's token
embeddings, and the mask prompts vs SAM's own prompt/output tokens (``--checkpoint shapes`` measures a
fresh random init).

``templates``: the annotate job's predictions (any mode) against the task shards' ground truth, per
Shapes-GRES template: mean IoU over the target expressions (a rejected target scores 0) and, for the
no-target ones, the share correctly rejected (``N-acc`` per template).

``bases``: what a LLaVA base (or any checkpoint's MLLM half) knows, on val images. ``image_tokens``: the
CLIP feature and the projected image token at each object's main patch, read out linearly (least squares
on half the objects, accuracy on the other half) into the object's row and column on the description
grammar's 5 x 5 grid, its shape and its colour. ``after_phrase``: teacher-forced on "where are ..."
questions (pipeline.prepare.formats.shapes_describe), the accuracy of the token predicted at each
``{phrase}:`` - the first object's row, or "none" - i.e. whether the state GSVA will read a ``[SEG]``
prompt from finds the phrase's object.

``oracle``: the preset's SAM (image encoder, prompt encoder, mask decoder: built as in training) trained
alone, its sparse prompt a bag-of-words embedding of the expression instead of the LLM's ``[SEG]`` hidden
state; same samples, loss, optimiser and schedule as the train job. It shows how fast the mask side
learns when the prompt is perfectly informative: the ceiling the LLM's prompt is compared with.
``--sam-base CK`` starts from that checkpoint's SAM with its image and prompt encoders frozen, as GSVA trains it
(``--train-encoder``: the image encoder trains too).
Results: printed and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gsva import decoding, prompts  # noqa: E402
from gsva.builder import build_sam  # noqa: E402
from gsva.config import preset  # noqa: E402
from gsva.losses import LossConfig, bce_per_mask, dice_per_mask  # noqa: E402
from gsva.predictor import GSVAPredictor  # noqa: E402
from gsva.transforms import masks_to_original, prepare_images  # noqa: E402
from pipeline.prepare.formats.shapes_text import COLORS, SHAPES, template_of  # noqa: E402
from pipeline.storage import filesystem  # noqa: E402
from pipeline.tasks import list_shards, parse_shard_name  # noqa: E402
from pipeline.train.config import OptimConfig  # noqa: E402
from pipeline.train.data import DecodeRow, draw_samples, gt_masks, labelled  # noqa: E402
from pipeline.train.optim import build_optimizer, set_lr  # noqa: E402


def load_split(data: str, split: str, limit: int | None = None) -> list[dict]:
    """Decoded task rows of one split, in order (small splits: read on the driver, no Ray needed)."""
    decode, rows = DecodeRow(), []
    for uri in list_shards(data):
        if (parse_shard_name(uri) or ("", 0))[0] != split:
            continue
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            rows += [decode(r) for r in pq.read_table(f).to_pylist()]
        if limit and len(rows) >= limit:
            break
    rows = [r for r in rows[:limit] if not r["error"]]
    if not rows:
        raise SystemExit(f"no decodable {split} images in {data}")
    return rows


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def pairwise(masks: list[np.ndarray]) -> list[float]:
    return [iou(masks[i], masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]


def per_template(ious: dict[str, list[float]]) -> dict[str, dict]:
    """{template: {n, mean_iou}} in template order, as both probes report it."""
    return {k: {"n": len(v), "mean_iou": round(float(np.mean(v)), 3)} for k, v in sorted(ious.items())}


@torch.inference_mode()
def seg_prompts(p: GSVAPredictor, image: np.ndarray, names: list[str]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(projected image tokens (P, H), LLM hidden states (M, H), mask prompts (M, D)) of one image's evaluation
    conversation, every expression answered [SEG] (teacher-forced)."""
    cfg, model = p.cfg, p.model
    names = prompts.eval_names(names, cfg)
    encoded = prompts.encode_eval(p.tokenizer, model.token_ids, names, [False] * len(names), cfg)
    prepared = prepare_images([image], cfg)
    tokens, _ = model.encode_images(prepared.clip_pixels, prepared.sam_pixels)
    decoded, _ = decoding.teacher_forced(model, [encoded], tokens)
    hidden = torch.stack([slot.hidden for slot in decoded[0].slots])
    return tokens[0], hidden, model.text_hidden_fcs(hidden)


def standardised(x: np.ndarray, half: int) -> np.ndarray:
    """Features standardised with the statistics of the first half (the probes' fitting half)."""
    return (x - x[:half].mean(0)) / (x[:half].std(0) + 1e-6)


def held_out(predicted: np.ndarray, truth: np.ndarray, classes: int) -> dict:
    """A probe's accuracy on the second half; chance = 1 / number of classes."""
    return {"accuracy": round(float((predicted == truth).mean()), 3), "chance": round(1 / classes, 3),
            "n_test": int(len(truth))}


def nearest_centroid(x: np.ndarray, labels: list[str]) -> dict:
    """Accuracy of a nearest-centroid classifier fitted on the first half, tested on the second (features
    standardised on the first half)."""
    y, half = np.array(labels), len(labels) // 2
    x = standardised(x, half)
    classes = sorted(set(y[:half]))
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in classes])
    pred = np.array(classes)[((x[half:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return held_out(pred, y[half:], len(classes))


def content_labels(text: str, target: np.ndarray) -> dict[str, str | None]:
    """Template of a sentence, its colour / shape where the template names exactly one of each, and where its
    target is (the row and column index of the mask's centre on the description grammar's 5 x 5 grid) for
    one-object templates."""
    from pipeline.prepare.formats.shapes_describe import grid_cell

    template, words = template_of(text), text.split()
    one = template == "the {color} {shape}"
    ys, xs = np.nonzero(target)
    located = template in ("the {color} {shape}", "the leftmost/rightmost {shape}") and len(xs)
    row, column = grid_cell(xs.mean(), ys.mean(), target.shape[1], target.shape[0]) if located else (None, None)
    return {"template": template,
            "colour": next((w for w in words if w in COLORS), None) if one or template == "all {color} shapes"
            else None,
            "shape": next((w for w in words if w in SHAPES), None) if one else None,
            "row": None if row is None else str(row), "column": None if column is None else str(column)}


def prompt_knowledge(p: GSVAPredictor, rows: list[dict]) -> dict:
    """``prompt_content``, ``prompt_readout`` and ``scales`` (see the module docstring)."""
    feats, hiddens, labels, spread, norms, image_norms = [], [], [], [], [], []
    for r in rows:
        exprs = [e for e in labelled(r["expressions"]) if not e["no_target"]][: p.cfg.max_expressions_per_prompt]
        if not exprs:
            continue
        tokens, hidden, prompt = seg_prompts(p, r["pixels"], [e["text"] for e in exprs])
        image_norms.append(float(tokens.norm(dim=-1).mean()))
        norms += prompt.norm(dim=-1).tolist()
        if len(prompt) > 1:
            spread.append(float((prompt - prompt.mean(0)).norm(dim=-1).mean() / prompt.norm(dim=-1).mean()))
        feats.append(prompt.float().numpy())
        hiddens.append(hidden.float().numpy())
        labels += [content_labels(e["text"], gt) for e, gt in zip(exprs, gt_masks(r["pixels"], exprs, r["image_id"]))]
    x, h = np.concatenate(feats), np.concatenate(hiddens)
    content, readout = {}, {"mask_prompt": {}, "llm_hidden": {}}
    for key in ("template", "colour", "shape", "row", "column"):
        keep = [i for i, lab in enumerate(labels) if lab[key] is not None]
        truth = [labels[i][key] for i in keep]
        if key in ("template", "colour", "shape"):
            content[key] = nearest_centroid(x[keep], truth)
        readout["mask_prompt"][key] = linear_readout(x[keep], truth)
        readout["llm_hidden"][key] = linear_readout(h[keep], truth)
    model = p.model
    decoder = model.sam.mask_decoder
    return {"prompt_content": content, "prompt_readout": readout, "scales": {
        "projected_image_token_norm": round(float(np.mean(image_norms)), 3),
        "text_token_embedding_norm": round(float(model.language_model.embed_tokens.weight.norm(dim=-1).mean()), 3),
        "mask_prompt_norm": round(float(np.mean(norms)), 3),
        "sam_mask_token_norm": round(float(decoder.mask_tokens.weight.norm(dim=-1).mean()), 3),
        "prompt_spread_within_conversation": round(float(np.mean(spread)), 3)}}


def diagnose(args) -> dict:
    p = GSVAPredictor.from_checkpoint(args.checkpoint, device="cpu")
    by_template: dict[str, list[float]] = {}
    alike_pred, alike_gt = [], []
    rows = load_split(args.data, "val", args.images)
    for r in rows:
        exprs = labelled(r["expressions"])
        gts = gt_masks(r["pixels"], exprs, r["image_id"])
        out = p.predict([r["pixels"]], [[e["text"] for e in exprs]], mode="teacher-forced",
                        no_target=[[bool(e["no_target"]) for e in exprs]])[0]
        preds, targets = [], []
        for e, gt, res in zip(exprs, gts, out):
            if e["no_target"]:
                continue
            pred = np.asarray(res.forced_mask, dtype=bool)
            by_template.setdefault(template_of(e["text"]), []).append(iou(pred, gt))
            preds.append(pred)
            targets.append(gt)
        alike_pred += pairwise(preds)
        alike_gt += pairwise(targets)
    return {"checkpoint": args.checkpoint, "images": args.images, "iou_by_template": per_template(by_template),
            "pairwise_iou_between_expressions": {"predicted": round(float(np.mean(alike_pred)), 3),
                                                 "ground_truth": round(float(np.mean(alike_gt)), 3)},
            **prompt_knowledge(p, rows)}


def templates(args) -> dict:
    from pipeline import masks as rle

    predicted = {}
    for path in sorted(Path(args.predictions).rglob("*.parquet")):
        for r in pq.read_table(path, columns=["expression_id", "rejected", "mask", "status"]).to_pylist():
            predicted[r["expression_id"]] = r
    by_template: dict[str, list[float]] = {}
    rejected_right: dict[str, list[float]] = {}
    for row in load_split(args.data, args.split):
        for e in labelled(row["expressions"]):
            p = predicted.get(e["expression_id"])
            if p is None:
                raise SystemExit(f"no prediction for expression {e['expression_id']}")
            ok = p["status"] == "ok"
            if e["no_target"]:
                rejected_right.setdefault(template_of(e["text"]), []).append(float(ok and p["rejected"]))
                continue
            pred = rle.decode(p["mask"]).astype(bool) if ok and not p["rejected"] else None
            gt = rle.decode(e["gt_mask"]).astype(bool)
            by_template.setdefault(template_of(e["text"]), []).append(iou(pred, gt) if pred is not None else 0.0)
    return {"predictions": args.predictions, "split": args.split, "iou_by_template": per_template(by_template),
            "no_target_rejected_by_template": {k: {"n": len(v), "accuracy": round(float(np.mean(v)), 3)}
                                               for k, v in sorted(rejected_right.items())}}


class BagOfWords(nn.Module):
    """Expression -> one prompt vector: sum of word + position embeddings, then an MLP (the oracle prompt)."""

    def __init__(self, dim: int, max_words: int = 16, width: int = 128):
        super().__init__()
        self.vocab: dict[str, int] = {}
        self.words = nn.Embedding(64, width)
        self.positions = nn.Embedding(max_words, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, dim))

    def forward(self, texts: list[str]) -> torch.Tensor:
        out = []
        for text in texts:
            ids = torch.tensor([self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])
            out.append((self.words(ids) + self.positions(torch.arange(len(ids)))).sum(0))
        return self.mlp(torch.stack(out))


def oracle_masks(sam, prompt: BagOfWords, embedding: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(M, L, L) low-res mask logits of one image's expressions, prompted by the oracle."""
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    masks, _ = sam.mask_decoder(image_embeddings=embedding[None], image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=prompt(texts)[:, None], dense_prompt_embeddings=dense,
                                multimask_output=False)
    return masks[:, 0]


def oracle(args) -> dict:
    torch.manual_seed(0)
    if args.train_encoder and not args.sam_base:
        raise SystemExit("oracle: --train-encoder needs --sam-base (from a random init every part trains)")
    if args.sam_base:  # GSVA's setting: a pretrained SAM whose image and prompt encoders stay frozen
        from gsva.checkpoint import load_model

        model, _, _ = load_model(args.sam_base)
        cfg, sam = model.cfg, model.sam.float()
        for part in (sam.prompt_encoder,) if args.train_encoder else (sam.image_encoder, sam.prompt_encoder):
            part.requires_grad_(False)
    else:
        cfg = preset(args.preset)
        sam = build_sam(cfg.sam)
    prompt = BagOfWords(cfg.sam.prompt_dim)
    params = [p for p in [*sam.parameters(), *prompt.parameters()] if p.requires_grad]
    optim_cfg = OptimConfig(lr=args.lr)  # the train job's recipe: AdamW, warm-up, linear decay, clip
    opt = build_optimizer(params, optim_cfg)
    loss_cfg, rng, rows = LossConfig(), random.Random(0), load_split(args.data, "train")
    history, window, start = [], [], time.time()
    step = 0
    while step < args.steps:
        rng.shuffle(rows)
        for i in range(0, len(rows) - args.batch_size + 1, args.batch_size):
            if step >= args.steps:
                break
            # an image whose drawn expressions are all no-target gives no sample (as in the train job)
            samples = [s for r in rows[i:i + args.batch_size]
                       for s in draw_samples(r["pixels"], labelled(r["expressions"]), r["image_id"], 3, rng)]
            if not samples:
                continue
            set_lr(opt, optim_cfg, step, args.steps)
            prepared = prepare_images([s.image for s in samples], cfg)
            embeddings = sam.image_encoder(prepared.sam_pixels)
            bce, dice, n = torch.zeros(()), torch.zeros(()), 0
            for j, s in enumerate(samples):
                keep = [(t, m) for t, m in zip(s.names, s.masks) if m.any()]
                if not keep:
                    continue
                low = oracle_masks(sam, prompt, embeddings[j], [t for t, _ in keep])
                for (_, m), logits in zip(keep, low):
                    pred = masks_to_original(logits[None], prepared.resized[j], prepared.original[j],
                                             cfg.sam.image_size)[0]
                    target = torch.from_numpy(m.astype(np.float32))
                    bce = bce + bce_per_mask(pred, target)
                    dice = dice + dice_per_mask(pred, target, loss_cfg.dice_scale, loss_cfg.eps)
                    n += 1
            loss = (loss_cfg.bce_weight * bce + loss_cfg.dice_weight * dice) / max(n, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.append([float(x.detach()) / max(n, 1) for x in (bce, dice)])
            step += 1
            if step % 50 == 0:
                b, d = np.mean(window, axis=0)
                history.append({"step": step, "bce": round(float(b), 4), "dice": round(float(d), 4),
                                "elapsed_s": round(time.time() - start, 1)})
                print(json.dumps(history[-1]), flush=True)
                window = []
    sam.eval()
    by_template: dict[str, list[float]] = {}
    with torch.no_grad():
        for r in load_split(args.data, "val", args.images):
            exprs = [e for e in labelled(r["expressions"]) if not e["no_target"]]
            if not exprs:
                continue
            prepared = prepare_images([r["pixels"]], cfg)
            low = oracle_masks(sam, prompt, sam.image_encoder(prepared.sam_pixels)[0], [e["text"] for e in exprs])
            for e, gt, logits in zip(exprs, gt_masks(r["pixels"], exprs, r["image_id"]), low):
                pred = masks_to_original(logits[None], prepared.resized[0], prepared.original[0],
                                         cfg.sam.image_size)[0] > 0
                by_template.setdefault(template_of(e["text"]), []).append(iou(pred.numpy(), gt))
    return {"preset": cfg.name, "sam_base": args.sam_base,
            "train_encoder": args.train_encoder, "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, "history": history, "images": args.images,
            "iou_by_template": per_template(by_template)}


def linear_readout(x: np.ndarray, labels: list[str]) -> dict:
    """Accuracy of a least-squares one-vs-all linear classifier fitted on the first half, tested on the second."""
    half = len(labels) // 2
    x = np.concatenate([standardised(x, half), np.ones((len(x), 1))], 1)
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    weights = np.linalg.lstsq(x[:half], np.eye(len(classes))[y[:half]], rcond=1e-3)[0]
    return held_out(np.argmax(x[half:] @ weights, 1), y[half:], len(classes))


def image_token_readout(model, rows: list[dict], objects) -> dict:
    """``image_tokens`` of ``bases`` (see the module docstring)."""
    from gsva.transforms import clip_input
    from gsva.vision_pretraining import patch_features, view_masks
    from pipeline.prepare.formats.shapes_describe import ROWS, from_annotation, position
    from pipeline.train.objects import object_masks

    cfg = model.cfg.vision
    grid = cfg.image_size // cfg.patch_size
    feats: dict[str, list[np.ndarray]] = {"clip_feature": [], "projected_token": []}
    labels: dict[str, list[str]] = {"row": [], "column": [], "shape": [], "colour": []}
    for r in rows:
        image, objs = r["pixels"], objects.get(str(r["image_id"]), [])
        pixels = clip_input(image, cfg)[None]
        with torch.no_grad():
            clip, projected = patch_features(model, pixels)[0], model.encode_clip(pixels)[0]
        masks = object_masks(objs, image.shape[0], image.shape[1], keep_empty=True)
        for obj, cover in zip(objs, view_masks(masks, cfg)):
            if cover.sum() < 4:
                continue  # outside CLIP's view (cut by the centre crop)
            main = int(cover.reshape(grid, cfg.patch_size, grid, cfg.patch_size).mean((1, 3)).argmax())
            where = position(from_annotation(obj.category, obj.attributes.get("color"), list(obj.bbox)),
                             image.shape[1], image.shape[0])
            row = next(w for w in ROWS if where.startswith(w + " "))
            feats["clip_feature"].append(clip[main].float().numpy())
            feats["projected_token"].append(projected[main].float().numpy())
            for key, value in (("row", row), ("column", where[len(row) + 1:]), ("shape", obj.category),
                               ("colour", obj.attributes.get("color"))):
                labels[key].append(value)
    return {name: {key: linear_readout(np.stack(x), y) for key, y in labels.items()} for name, x in feats.items()}


def after_phrase_accuracy(model, tokenizer, rows: list[dict], objects, k: int) -> dict:
    """``after_phrase`` of ``bases`` (see the module docstring)."""
    from gsva.alignment import TextSample, answer_logits, make_text_batch
    from pipeline.prepare.formats.shapes_describe import ABSENT, from_annotation, where_question

    colon = tokenizer.encode(":", add_bos=False)[0][-1]
    counts = {"present": [0, 0], "absent": [0, 0]}
    for start in range(0, len(rows), 8):
        samples = []
        for r in rows[start:start + 8]:
            objs = [from_annotation(o.category, o.attributes.get("color"), list(o.bbox))
                    for o in objects.get(str(r["image_id"]), [])]
            if objs:
                image = r["pixels"]
                samples.append(TextSample(image, *where_question(objs, image.shape[1], image.shape[0], k,
                                                                 random.Random(f"val/{r['image_id']}"))))
        batch = make_text_batch(samples, tokenizer, model.cfg, model.token_ids)
        with torch.no_grad():
            predicted = answer_logits(model, batch)[:, :-1].argmax(-1)
        labels, inputs = batch.labels[:, 1:], batch.input_ids[:, :-1]
        # the answer's colons: every labelled position after a ':' except the first (the ASSISTANT's)
        for row in range(len(samples)):
            spots = [int(i) for i in torch.nonzero((inputs[row] == colon) & (labels[row] != prompts.IGNORE_INDEX))]
            for i in spots[1:]:
                kind = "absent" if tokenizer.decode([int(labels[row, i])]).strip() == ABSENT else "present"
                counts[kind][0] += int(predicted[row, i] == labels[row, i])
                counts[kind][1] += 1
    return {kind: {"accuracy": round(hit / max(n, 1), 3), "n": n} for kind, (hit, n) in counts.items()}


def bases(args) -> dict:
    from gsva.checkpoint import load_model
    from pipeline.train.objects import load_objects

    model, tokenizer, _ = load_model(args.checkpoint)
    model.eval()
    objects, _ = load_objects(args.objects)
    rows = load_split(args.data, "val", args.images)
    return {"checkpoint": args.checkpoint, "images": len(rows),
            "image_tokens": image_token_readout(model, rows, objects),
            "after_phrase": after_phrase_accuracy(model, tokenizer, rows, objects,
                                                  model.cfg.max_expressions_per_prompt)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="probe", required=True)
    d = sub.add_parser("diagnose")
    d.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "shapes-gres"))
    o = sub.add_parser("oracle")
    o.add_argument("--preset", default="shapes")
    o.add_argument("--steps", type=int, default=600)
    o.add_argument("--lr", type=float, default=3e-4)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--sam-base", help="start from this checkpoint's SAM, image and prompt encoders frozen (GSVA)")
    o.add_argument("--train-encoder", action="store_true", help="with --sam-base: SAM's image encoder trains too")
    b = sub.add_parser("bases")
    b.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "shapes-llava-base"))
    b.add_argument("--objects", required=True, help="the dataset's COCO instances.json")
    t = sub.add_parser("templates")
    t.add_argument("--predictions", required=True, help="the annotate job's predictions folder")
    t.add_argument("--split", default="test")
    for p in (d, o, b, t):
        p.add_argument("--data", required=True, help="Shapes-GRES task shards (jobs.prepare --format shapes)")
        p.add_argument("--images", type=int, default=150, help="val images scored")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", help="JSON file for the result")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"diagnose": diagnose, "oracle": oracle, "bases": bases, "templates": templates}[args.probe](args)
    shown = ("pairwise_iou_between_expressions", "prompt_content", "prompt_readout", "scales",
             "no_target_rejected_by_template", "image_tokens", "after_phrase")
    print(json.dumps(result.get("iou_by_template", {}) | {k: v for k, v in result.items() if k in shown}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
