"""The report's pictures (matplotlib, PNG bytes): per-group bars, the per-expression IoU histogram, the
no-target decision confusion matrix, and a gallery of overlays of the best, worst and rejected cases.

Only the gallery touches images: it reads the handful of picked images from the task shards (filter pushed
down to the Parquet scan) and decodes their masks; nothing else here sees a pixel.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np

from gsva.overlay import blend
from pipeline import masks
from pipeline.images import ImageError, decode_image, read_image_bytes
from pipeline.score import metrics
from pipeline.score.cases import KINDS, CaseBook
from pipeline.score.graph import ScoreConfig
from pipeline.storage import StorageError, filesystem

BAR_KEYS = ("giou", "ciou", "n_acc", "t_acc", "miou", "rec_acc@0.5")
GT_COLOUR = "cyan"  # outline; both colours stay apart from the shapes' red, green, blue and yellow
PRED_COLOUR = (255, 0, 255)  # magenta fill
OVERLAY_ALPHA = 0.5
DPI = 110
GALLERY_DPI = 80  # photos compress badly in PNG: keep the gallery file small
TITLE_WIDTH = 30  # characters per line of a gallery caption


def _figure(width: float, height: float, dpi: int = DPI):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=dpi)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def split_bars(doc: dict) -> bytes:
    """Grouped bars: one group of bars per split (and overall), one bar per metric, in percent."""
    groups = [*doc["splits"].items(), ("overall", doc["overall"])]
    plt, fig = _figure(max(6.0, 1.6 * len(groups) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(BAR_KEYS)
    x = np.arange(len(groups))
    for i, key in enumerate(BAR_KEYS):
        values = [100.0 * m[key] if m.get(key) is not None else 0.0 for _, m in groups]
        ax.bar(x + (i - (len(BAR_KEYS) - 1) / 2) * width, values, width, label=key.replace("_", "-"))
    ax.set_xticks(x, [name for name, _ in groups])
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"Scores per group ({doc['protocol']} protocol; missing bar = undefined)")
    ax.legend(ncol=3, fontsize=8)
    return _png(plt, fig)


def iou_histogram(stats: metrics.ScoreStats) -> bytes:
    """Histogram of the per-expression IoU of target expressions, with the no-target outcome alongside."""
    plt, fig = _figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, metrics.HIST_BINS + 1)
    ax.bar(edges[:-1], stats.iou_hist, width=1.0 / metrics.HIST_BINS, align="edge", edgecolor="black")
    ax.set_xlabel("per-expression IoU (target expressions)")
    ax.set_ylabel("expressions")
    ax.set_title(f"{stats.targets} targets; no-target: {stats.tp} rejected (IoU 1), "
                 f"{stats.fn} not rejected (IoU 0)", fontsize=9)
    return _png(plt, fig)


def confusion(stats: metrics.ScoreStats) -> bytes:
    """2x2 matrix: ground truth (target / no-target) against the decision (segment / reject)."""
    plt, fig = _figure(4.6, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    cells = np.array([[stats.tn, stats.fp], [stats.fn, stats.tp]], dtype=np.int64)
    ax.imshow(cells, cmap="Blues")
    for (r, c), v in np.ndenumerate(cells):
        share = v / max(cells[r].sum(), 1)
        ax.text(c, r, f"{v}\n{100 * share:.1f}%", ha="center", va="center",
                color="white" if v > cells.max() / 2 else "black")
    ax.set_xticks([0, 1], ["segmented", "rejected"])
    ax.set_yticks([0, 1], ["target", "no-target"])
    ax.set_xlabel("decision (errors count as the wrong one)")
    m = stats.metrics()
    ax.set_title(f"T-acc {_pct(m['t_acc'])}   N-acc {_pct(m['n_acc'])}", fontsize=10)
    return _png(plt, fig)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def load_case_images(cfg: ScoreConfig, cases: CaseBook) -> dict[tuple[str, str], np.ndarray | None]:
    """RGB images of the picked cases, None where unreadable (the picture then shows the masks alone).

    Reads only the task-shard files the cases came from, only their rows (filter on image_id), on the driver:
    a dozen images, so no Ray job; `image` bytes first, else the file at `image_uri`.
    """
    import pyarrow.parquet as pq

    images: dict[tuple[str, str], np.ndarray | None] = {}
    fs, _ = filesystem(cfg.ground_truth, cfg.storage)
    for source, keys in cases.image_keys().items():
        images.update({k: None for k in keys})
        if source is None:
            continue
        try:
            table = pq.read_table(source, filesystem=fs, columns=["dataset", "image_id", "image", "image_uri"],
                                  filters=[("image_id", "in", sorted({i for _, i in keys}))])
        except Exception:  # noqa: BLE001 - a shard gone since scoring leaves its pictures without image
            continue
        for row in table.to_pylist():
            key = (row["dataset"], row["image_id"])
            if key in keys and images[key] is None:
                images[key] = _read_image(row, cfg)
    return images


def _read_image(row: dict, cfg: ScoreConfig) -> np.ndarray | None:
    """The case's RGB pixels through the pipeline's one reader and decoder (regular files within the byte cap
    only), None when the image cannot be used."""
    name = f"image {row['image_id']}"
    try:
        data = row["image"]
        if data is None and row["image_uri"]:
            data = read_image_bytes(row["image_uri"], cfg.storage)
        return decode_image(data, name) if data is not None else None
    except (ImageError, StorageError):  # unreadable image: the picture shows the masks alone
        return None


def overlay(image: np.ndarray | None, pred: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """The image (grey canvas when missing) with the predicted mask filled in translucent magenta."""
    return blend(image, [] if pred is None else [pred], [PRED_COLOUR], shape, OVERLAY_ALPHA)


def gallery(cases: CaseBook, images: dict[tuple[str, str], np.ndarray | None]) -> bytes:
    """Rows best / worst / rejected; each cell the overlay, the expression, the decision and the IoU."""
    cols = max(1, cases.per_kind)
    plt, fig = _figure(2.6 * cols, 3.0 * len(KINDS), GALLERY_DPI)
    for r, kind in enumerate(KINDS):
        for c in range(cols):
            ax = fig.add_subplot(len(KINDS), cols, r * cols + c + 1)
            ax.axis("off")
            if c >= len(cases.cases[kind]):
                continue
            case = cases.cases[kind][c]
            gt = masks.decode(case["gt_mask"])
            pred = masks.decode(case["mask"]) if case["mask"] is not None else None
            image = images.get((case["dataset"], case["image_id"]))
            ax.imshow(overlay(image, pred, gt.shape))
            if gt.any():
                ax.contour(gt, levels=[0.5], colors=GT_COLOUR, linewidths=1.6)
            truth = "no-target" if case["no_target"] else "target"
            caption = textwrap.fill(f"\"{case['text']}\"", TITLE_WIDTH)
            note = "" if image is not None else " · no image"
            ax.set_title(f"{caption}\n{kind}: {case['decision']} ({truth}) · IoU {case['iou']:.2f}{note}", fontsize=8)
    fig.suptitle("cyan outline = ground truth, magenta = prediction", fontsize=9)
    return _png(plt, fig)
