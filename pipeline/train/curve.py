"""The training curve: loss parts and lr per step, validation metrics per interval, as one PNG.

Rendered from the metrics history (a list of per-step records) with matplotlib's Agg backend, so it
works on headless workers; the bytes are written next to the checkpoints by the caller.
"""

from __future__ import annotations

import io
from typing import Any

LOSS_KEYS = (("loss", "total"), ("ce", "CE"), ("bce", "BCE"), ("dice", "DICE"))
VAL_KEYS = (("val/giou", "gIoU"), ("val/ciou", "cIoU"), ("val/n_acc", "N-acc"), ("val/t_acc", "T-acc"),
            ("val/point_iou", "point-prompt IoU"), ("val/box_iou", "box-prompt IoU"),
            ("val/answer_token_acc", "answer token accuracy"))
SMOOTH_WINDOW = 25  # steps of the running mean drawn over the raw loss


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def render(history: list[dict[str, Any]], title: str) -> bytes:
    """PNG bytes of the curve (losses on a log axis, lr, validation metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in history if "loss" in r]
    for key, label in LOSS_KEYS:
        values = [r[key] for r in history if "loss" in r]
        if any(values):  # a stage without that part (SAM: no CE, LLaVA: no masks) draws no flat zero line
            ax_loss.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax_loss.plot(steps, _smooth(values, SMOOTH_WINDOW), label=label, color=ax_loss.lines[-1].get_color())
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (running mean)")
    ax_loss.legend(loc="upper right")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(steps, [r["lr"] for r in history if "loss" in r], color="grey", linestyle=":", label="lr")
    ax_lr.set_ylabel("lr")
    for key, label in VAL_KEYS:
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        if points:
            ax_val.plot(*zip(*points), marker="o", label=label)
    ax_val.set_ylim(0, 1)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation")
    ax_val.grid(alpha=0.3)
    if ax_val.lines:
        ax_val.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
