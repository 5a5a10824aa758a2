"""Pictures of predictions: an image with each expression's mask in its own colour and a legend of expressions.

One module for every overlay the project draws (``python -m gsva predict``'s overlay.png, annotate's demo
gallery, the score report's gallery cells), so a mask looks the same everywhere. matplotlib (Agg) draws;
its import is deferred, so importing this module costs nothing.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass

import numpy as np

#: Mask fill colours (RGB), picked far from Shapes-GRES's red, green, blue and yellow objects and from grey.
PALETTE = ((255, 0, 255), (0, 255, 255), (255, 140, 0), (140, 60, 255), (128, 0, 0), (0, 128, 128),
           (255, 105, 180), (120, 70, 20))
ALPHA = 0.5  # fill opacity
CANVAS_GREY = 128.0  # the background when the image is missing or of another size than the masks
DPI = 100
LEGEND_WIDTH = 36  # characters per legend line
PANEL_INCHES = 3.2


@dataclass(frozen=True)
class Shown:
    """One expression in a picture: its label and its mask (None: listed without a colour, after `absent`)."""

    label: str
    mask: np.ndarray | None
    absent: str = "rejected"  # why there is no mask: "rejected", "error", ...


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def blend(image: np.ndarray | None, masks: list[np.ndarray], colours: list[tuple[int, int, int]],
          shape: tuple[int, int] | None = None, alpha: float = ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: the image (grey canvas when missing or of another size) with each bool (H, W) mask
    filled translucently in its colour, later masks over earlier ones."""
    shape = shape or (masks[0].shape if masks else image.shape[:2])  # type: ignore[union-attr]
    usable = image is not None and image.shape[:2] == tuple(shape)
    base = image[..., :3].astype(np.float64) if usable else np.full((*shape, 3), CANVAS_GREY)
    for mask, rgb in zip(masks, colours):
        base[mask] = (1 - alpha) * base[mask] + alpha * np.asarray(rgb, np.float64)
    return np.clip(base, 0, 255).astype(np.uint8)


def draw(ax, image: np.ndarray | None, shown: list[Shown], title: str | None = None) -> None:
    """Draw one picture on a matplotlib axis: the non-rejected masks filled and outlined in their colours, and
    a legend below it naming every expression (coloured patch, or "rejected")."""
    from matplotlib.patches import Patch

    kept = [(i, s) for i, s in enumerate(shown) if s.mask is not None]
    shape = kept[0][1].mask.shape if kept else None
    ax.imshow(blend(image, [s.mask for _, s in kept], [colour(i) for i, _ in kept], shape))
    for i, s in kept:  # outlines keep overlapping masks apart where their fills mix
        if s.mask.any():
            ax.contour(s.mask, levels=[0.5], colors=[np.asarray(colour(i)) / 255], linewidths=1.2)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    handles = []
    for i, s in enumerate(shown):
        label = textwrap.shorten(s.label, LEGEND_WIDTH, placeholder="...")
        if s.mask is None:
            handles.append(Patch(facecolor="none", edgecolor="grey", label=f"{s.absent}: {label}"))
        else:
            handles.append(Patch(facecolor=np.asarray(colour(i)) / 255, edgecolor="black", label=label))
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, frameon=False)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gallery_png(panels: list[tuple[np.ndarray | None, list[Shown], str | None]], columns: int = 3) -> bytes:
    """PNG bytes of a grid of pictures, one per (image, expressions, title)."""
    plt = _pyplot()
    columns = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    longest = max((len(s) for _, s, _ in panels), default=0)
    fig = plt.figure(figsize=(PANEL_INCHES * columns, (PANEL_INCHES + 0.18 * longest) * rows), dpi=DPI)
    for n, (image, shown, title) in enumerate(panels):
        draw(fig.add_subplot(rows, columns, n + 1), image, shown, title)
    return _png(plt, fig)


def overlay_png(image: np.ndarray, shown: list[Shown], title: str | None = None) -> bytes:
    """PNG bytes of one picture: the image, its masks, the legend."""
    return gallery_png([(image, shown, title)], columns=1)
