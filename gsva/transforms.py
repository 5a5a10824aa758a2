"""The ONE image pre/post-processing module, shared by training and inference; all sizes from the config.

- SAM: RGB uint8 -> longest side to ``sam.image_size`` (round half up, segment_anything's
  ResizeLongestSide) -> normalise with SAM's mean/std -> zero-pad bottom/right to a square.
- CLIP: shortest edge to ``vision.image_size`` (bicubic) -> centre crop -> /255 -> CLIP mean/std; or, with
  ``vision.aspect == "pad"``, pad to a square with the mean colour first, then resize (LLaVA-1.5).
- Masks: low-res logits -> bilinear to the SAM input size -> crop to the resized (h', w') ->
  bilinear to the original (H, W); binarise at logit > 0.
The statistics live in the config, which is saved as the checkpoint's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gsva.config import GSVAConfig, SAMConfig, VisionConfig
from gsva.images import ImageError, to_rgb_uint8  # noqa: F401 - ImageError is what prepare_images raises

UINT8_MAX = 255


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h', w') after scaling the longest side to ``long_side``, rounding half up (as SAM)."""
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sam_input(rgb: np.ndarray, cfg: SAMConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, S, S) float32 normalised and zero-padded, and the resized (h', w')."""
    h, w = resized_shape(rgb.shape[0], rgb.shape[1], cfg.image_size)
    # PIL bilinear resize of the uint8 image, as segment_anything's ResizeLongestSide.apply_image does.
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
    mean = torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, cfg.image_size - w, 0, cfg.image_size - h)), (h, w)


def sam_frame_masks(masks: list[np.ndarray], cfg: SAMConfig) -> np.ndarray:
    """(M, S, S) float coverage of each (H, W) bool mask in SAM's input frame: resized as ``sam_input`` resizes
    the image (PIL bilinear), zero-padded bottom/right."""
    out = np.zeros((len(masks), cfg.image_size, cfg.image_size), dtype=np.float32)
    for i, m in enumerate(masks):
        h, w = resized_shape(m.shape[0], m.shape[1], cfg.image_size)
        out[i, :h, :w] = np.asarray(Image.fromarray(m.astype(np.uint8) * UINT8_MAX).resize((w, h), Image.BILINEAR),
                                    dtype=np.float32) / UINT8_MAX
    return out


def clip_frame(image: Image.Image, cfg: VisionConfig, resample: int, fill) -> Image.Image:
    """Any (W, H) PIL image -> the (C, C) view CLIP sees (``cfg.aspect``); images and masks share it."""
    size, (width, height) = cfg.image_size, image.size
    if cfg.aspect == "pad":
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas.resize((size, size), resample)
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))


def clip_input(rgb: np.ndarray, cfg: VisionConfig) -> torch.Tensor:
    """(3, C, C) float32: the CLIP view (bicubic), /255, CLIP mean/std."""
    fill = tuple(int(m * UINT8_MAX) for m in cfg.pixel_mean)
    view = np.asarray(clip_frame(Image.fromarray(rgb), cfg, Image.BICUBIC, fill))
    x = torch.from_numpy(view.copy()).permute(2, 0, 1).float() / UINT8_MAX
    mean = torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class PreparedImages:
    """Model inputs for N images plus what post-processing needs to return to original sizes."""

    sam_pixels: torch.Tensor  # (N, 3, S, S) float32
    clip_pixels: torch.Tensor  # (N, 3, C, C) float32
    resized: list[tuple[int, int]]  # (h', w') inside the SAM input
    original: list[tuple[int, int]]  # (H, W)


def prepare_images(images: list[np.ndarray], cfg: GSVAConfig) -> PreparedImages:
    """Validate and preprocess RGB images (see to_rgb_uint8 for what is accepted)."""
    sams, clips, resized, original = [], [], [], []
    for i, image in enumerate(images):
        rgb = to_rgb_uint8(image, name=f"image {i}")
        s, hw = sam_input(rgb, cfg.sam)
        sams.append(s)
        clips.append(clip_input(rgb, cfg.vision))
        resized.append(hw)
        original.append((rgb.shape[0], rgb.shape[1]))
    return PreparedImages(torch.stack(sams), torch.stack(clips), resized, original)


def masks_to_original(low_res: torch.Tensor, resized: tuple[int, int], original: tuple[int, int],
                      sam_size: int) -> torch.Tensor:
    """(M, h, w) low-res mask logits -> (M, H, W) logits at the original size (differentiable)."""
    x = low_res[:, None]
    if x.dtype in (torch.float16, torch.bfloat16):  # interpolate the logits in float32
        x = x.float()
    x = F.interpolate(x, (sam_size, sam_size), mode="bilinear", align_corners=False)
    x = x[..., : resized[0], : resized[1]]
    return F.interpolate(x, original, mode="bilinear", align_corners=False)[:, 0]
