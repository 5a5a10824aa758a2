"""Encoded image bytes -> RGB uint8 (H, W, 3), with one clear reason for every image that cannot be used.

Every stage that needs pixels (prepare when embedding, annotate) decodes through `decode_image`, so a
16-bit PNG, a CMYK JPEG or a phone photo with an EXIF rotation look the same everywhere. Limits are a
frozen config (`ImageLimits`) instead of Pillow's module-global `MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.storage import StorageError, StorageOptions, describe_error, filesystem

#: Largest accepted image, in pixels (about 8k x 6k). COCO images are ~0.3 Mpx; anything near this limit
#: is either a panorama worth resizing first or a decompression bomb (a tiny file that expands to GBs).
DEFAULT_MAX_PIXELS = 50_000_000
#: Smallest accepted side, in pixels: a 1-px-wide image cannot hold a segmentable object.
DEFAULT_MIN_SIDE = 2
#: Transparent pixels are composited onto white, as image viewers show them to a human annotator.
ALPHA_BACKGROUND = (255, 255, 255)
#: 16-bit samples are scaled to 8 bits by this divisor (65535 / 255), so full range maps to full range.
UINT16_TO_UINT8 = 257.0

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An unusable image: `reason` is a short category for summaries, the message names the item."""

    def __init__(self, message: str, reason: str = "unreadable image") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What `decode_image` accepts; validated on construction."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"image limits must be positive, got {self}")


def _check_size(width: int, height: int, limits: ImageLimits, name: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(f"{name}: decompression bomb refused: {width}x{height} = {width * height} pixels "
                         f"exceeds the limit of {limits.max_pixels}", "decompression bomb")
    if min(width, height) < limits.min_side:
        raise ImageError(f"{name}: too small: {width}x{height}, each side must be >= {limits.min_side} px",
                         "image too small")


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8, scaling 16-bit data and compositing alpha onto white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        data = np.asarray(img, dtype=np.float64)
        if data.min() < 0 or data.max() > np.iinfo(np.uint16).max:
            raise ImageError(f"{name}: {img.mode} samples outside the 16-bit range cannot be mapped to RGB",
                             "unsupported pixel format")
        grey = np.round(data / UINT16_TO_UINT8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if (img.mode == "P" and "transparency" in img.info) or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    if img.mode == "F":
        raise ImageError(f"{name}: floating-point images (mode F) have no defined 8-bit range",
                         "unsupported pixel format")
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB: {exc}",
                         "unsupported pixel format") from exc
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def decode_image(data: bytes, name: str = "image", limits: ImageLimits | None = None) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> RGB uint8 array (H, W, 3), EXIF orientation applied.

    Raises ImageError naming `name` and the reason: zero bytes, not an image, corrupt or truncated,
    decompression bomb, too small, or a pixel format without an RGB meaning.
    """
    limits = limits or ImageLimits()
    if not data:
        raise ImageError(f"{name}: zero-byte file", "empty image file")
    with warnings.catch_warnings():
        # Our own limit decides; Pillow's global one only warns (or errors beyond 2x, handled below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image (unrecognised format)", "not an image") from exc
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: decompression bomb refused: {exc}", "decompression bomb") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{name}: corrupt image header: {exc}", "corrupt image") from exc
        with img:
            _check_size(img.width, img.height, limits, name)
            try:
                img.load()
                oriented = ImageOps.exif_transpose(img)
            except Image.DecompressionBombError as exc:
                raise ImageError(f"{name}: decompression bomb refused: {exc}", "decompression bomb") from exc
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise ImageError(f"{name}: corrupt or truncated image data: {exc}", "corrupt image") from exc
            return _to_rgb(oriented, name)


def read_image_bytes(uri: str, storage: StorageOptions | None = None) -> bytes:
    """The raw bytes of a referenced image (local path, file:// or s3://).

    A missing file is an ImageError (one bad item); any other storage failure (refused credentials,
    unreachable endpoint) is a StorageError, because it concerns the whole job, not this image.
    """
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ImageError(f"{uri}: missing image (no such file)", "missing image") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{uri}: is a directory, not an image", "missing image") from exc
    except Exception as exc:  # re-raised with a clear, credential-free message
        raise StorageError(describe_error(uri, exc)) from exc


def image_exists(uri: str, storage: StorageOptions | None = None) -> bool:
    """Whether a referenced image exists as a file (cheap: no bytes are read)."""
    fs, path = filesystem(uri, storage)
    try:
        return bool(fs.isfile(path))
    except Exception as exc:  # re-raised with a clear, credential-free message
        raise StorageError(describe_error(uri, exc)) from exc
