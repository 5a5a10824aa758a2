"""Image files -> bytes -> RGB uint8 (H, W, 3), with one clear reason for every image that cannot be used.

The one image reader, decoder and validator of the project: the jobs (prepare, annotate, train, the score
report, through `pipeline.images`), `python -m gsva predict`, and the predictor's check of arrays handed to it
(`to_rgb_uint8`) all use this module.

Every stage that needs an image reads it through `read_image_bytes` (or checks it without reading through
`check_image_file`) and decodes through `decode_image` (prepare, annotate, train, the score report), so a
16-bit PNG, a CMYK JPEG or a phone photo with an EXIF rotation look the same everywhere, and no stage can be
made to read a device file, a FIFO or an endless stream: only regular files are opened (checked with stat
before the open, and again on the open descriptor, which is opened non-blocking), and never more than
`max_bytes` are read. Limits are a frozen config (`ImageLimits`) instead of Pillow's module-global
`MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gsva.storage import StorageError, StorageOptions, describe_error, filesystem, is_local

#: Largest accepted image, in pixels (about 8k x 6k). COCO images are ~0.3 Mpx; anything near this limit
#: is either a panorama worth resizing first or a decompression bomb (a tiny file that expands to GBs).
DEFAULT_MAX_PIXELS = 50_000_000
#: Smallest accepted side, in pixels: a 1-px-wide image cannot hold a segmentable object.
DEFAULT_MIN_SIDE = 2
#: Largest accepted image file, in bytes. A 50-Mpx PNG is ~150 MB only when stored raw; real photos and
#: dataset images are well under 20 MB. The cap is checked before reading and bounds every read.
DEFAULT_MAX_BYTES = 64 * 2**20
#: Transparent pixels are composited onto white, as image viewers show them to a human annotator.
ALPHA_BACKGROUND = (255, 255, 255)
#: 16-bit samples are scaled to 8 bits by this divisor (65535 / 255), so full range maps to full range.
UINT16_TO_UINT8 = 257.0
UINT16_MAX = 65535

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
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 1 or self.max_bytes < 1:
            raise ValueError(f"image limits must be positive, got {self}")


def _check_size(width: int, height: int, limits: ImageLimits, name: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(f"{name}: decompression bomb refused: {width}x{height} = {width * height} pixels "
                         f"exceeds the limit of {limits.max_pixels}", "decompression bomb")
    if min(width, height) < limits.min_side:
        raise ImageError(f"{name}: too small: {width}x{height}, each side must be >= {limits.min_side} px",
                         "image too small")


def scale_16_to_8(data: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8, full range onto full range (no ties: 257 is odd, so rounding is exact)."""
    return np.round(np.asarray(data, dtype=np.float64) / UINT16_TO_UINT8).astype(np.uint8)


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8, scaling 16-bit data and compositing alpha onto white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        data = np.asarray(img, dtype=np.float64)
        if data.min() < 0 or data.max() > UINT16_MAX:
            raise ImageError(f"{name}: {img.mode} samples outside the 16-bit range cannot be mapped to RGB",
                             "unsupported pixel format")
        return np.ascontiguousarray(np.repeat(scale_16_to_8(data)[:, :, None], 3, axis=2))
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
    if len(data) > limits.max_bytes:
        raise _too_large(name, len(data), limits.max_bytes)
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


def _too_large(name: str, size: int, max_bytes: int) -> ImageError:
    return ImageError(f"{name}: image file of {size} bytes exceeds the limit of {max_bytes} bytes",
                      "image file too large")


def _not_regular(uri: str, mode: int) -> ImageError:
    if stat.S_ISDIR(mode):
        return ImageError(f"{uri}: is a directory, not an image", "not a regular file")
    kind = ("a FIFO" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    return ImageError(f"{uri}: not a regular file ({kind}); only regular files are read as images",
                      "not a regular file")


def _local_size(uri: str, path: str, max_bytes: int) -> int:
    """Size of a local regular file within the cap (stat follows symlinks), else ImageError."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageError(f"{uri}: missing image (no such file)", "missing image") from exc
    except OSError as exc:  # permission denied, too many links...: this file's problem only
        raise ImageError(f"{uri}: cannot stat: {exc.strerror or exc}", "unreadable image") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(uri, st.st_mode)
    if st.st_size > max_bytes:
        raise _too_large(uri, st.st_size, max_bytes)
    return st.st_size


def _read_local(uri: str, path: str, max_bytes: int) -> bytes:
    """Bytes of a local regular file. Opened non-blocking (a FIFO swapped in after the stat cannot block the
    open) and checked again on the descriptor; at most max_bytes + 1 are read, whatever the file does."""
    _local_size(uri, path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageError(f"{uri}: cannot open: {exc.strerror or exc}", "unreadable image") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(uri, mode)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the stat
        raise _too_large(uri, len(data), max_bytes)
    return data


def _remote_size(fs, uri: str, path: str, max_bytes: int) -> int:
    """Size of an object-store image within the cap (objects are regular by construction), else ImageError."""
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise ImageError(f"{uri}: missing image (no such file)", "missing image") from exc
    except Exception as exc:  # re-raised with a clear, credential-free message
        raise StorageError(describe_error(uri, exc)) from exc
    if info.get("type") == "directory":
        raise ImageError(f"{uri}: is a directory, not an image", "missing image")
    size = int(info.get("size") or 0)
    if size > max_bytes:
        raise _too_large(uri, size, max_bytes)
    return size


def check_image_file(uri: str, storage: StorageOptions | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Check a referenced image without reading it: it exists, is a regular file and holds at most
    `max_bytes`. Returns its size; raises ImageError (this image) or StorageError (the whole job)."""
    fs, path = filesystem(uri, storage)
    if is_local(uri):
        return _local_size(uri, path, max_bytes)
    return _remote_size(fs, uri, path, max_bytes)


def read_image_bytes(uri: str, storage: StorageOptions | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw bytes of a referenced image (local path, file:// or s3://), at most `max_bytes`.

    Local: regular files only (stat before the open, non-blocking open, fstat after), so a FIFO, /dev/zero
    or /dev/urandom is refused instead of hanging or filling memory. Object stores: the object's size is
    checked before the read, and the read stops at the cap. A missing, special or oversized file is an
    ImageError (one bad item); any other storage failure (refused credentials, unreachable endpoint) is a
    StorageError, because it concerns the whole job, not this image.
    """
    fs, path = filesystem(uri, storage)
    if is_local(uri):
        return _read_local(uri, path, max_bytes)
    try:
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)  # from the open's own metadata request: no second round trip
            if size is not None and size > max_bytes:
                raise _too_large(uri, int(size), max_bytes)
            data = f.read(max_bytes + 1)
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ImageError(f"{uri}: missing image (no such file)", "missing image") from exc
    except Exception as exc:  # re-raised with a clear, credential-free message
        raise StorageError(describe_error(uri, exc)) from exc
    if len(data) > max_bytes:
        raise _too_large(uri, len(data), max_bytes)
    return data


def to_rgb_uint8(image: np.ndarray, name: str = "image", limits: ImageLimits | None = None) -> np.ndarray:
    """Normalise an array handed to the predictor to RGB uint8 (H, W, 3), or raise ImageError naming ``name``.

    Accepted: uint8 or uint16 (scaled as decoded images are) arrays shaped (H, W) grey, (H, W, 1) grey,
    (H, W, 2) grey+alpha, (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped). Rejected: other dtypes (floats are
    ambiguous in range), other shapes, and sizes outside ``limits`` (the same pixel cap as decoded files).
    """
    limits = limits or ImageLimits(min_side=1)
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype == np.uint16:
        image = scale_16_to_8(image)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 (or uint16) pixels, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (1, 2):
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"{name}: expected (H, W), (H, W, 1|2|3|4) pixels, got shape {image.shape}")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ImageError(f"{name}: empty image of shape {image.shape}")
    _check_size(w, h, limits, name)
    return np.ascontiguousarray(image[:, :, :3])
