"""decode_image: every pixel format to RGB uint8, EXIF orientation, and a clear reason for each bad image."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, ImageLimits, check_image_file, decode_image, read_image_bytes


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) and holds a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def test_rgb_and_grey_modes():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = decode_image(_encode(Image.fromarray(rgb)))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3) and (out == rgb).all()
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(grey, "L")))
    assert (out == grey[:, :, None]).all()
    assert (decode_image(_encode(Image.fromarray(grey, "L").convert("1"))) % 255 == 0).all()


def test_sixteen_bit_is_scaled_not_clipped():
    data = np.array([[0, 257 * 100], [65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(data)
    assert img.mode.startswith("I;16")
    out = decode_image(_encode(img))
    assert out[:, :, 0].tolist() == [[0, 100], [255, 4]]
    assert (out[:, :, 0] == out[:, :, 2]).all()


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[1, 0] = (0, 0, 255, 128)  # half blue
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 255]
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]] * 2, dtype=np.uint8), "LA")
    assert decode_image(_encode(la))[:, :, 0].tolist() == [[255, 50], [255, 50]]


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = decode_image(_encode(pal))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]
    out = decode_image(_encode(pal, transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 100, 50]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert out.shape == (8, 8, 3)
    r, g, b = out[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    img = np.zeros((2, 4, 3), dtype=np.uint8)
    img[0, 0] = (255, 0, 0)  # red top-left of a 4-wide, 2-high image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_encode(Image.fromarray(img), "PNG", exif=exif.tobytes()))
    assert out.shape == (4, 2, 3)
    assert out[0, 1].tolist() == [255, 0, 0]  # the top-left pixel is now top-right


@pytest.mark.parametrize("data, reason", [
    (b"", "empty image file"),
    (b"this is not an image at all", "not an image"),
    (_encode(Image.new("RGB", (1, 9))), "image too small"),
])
def test_bad_bytes_have_clear_reasons(data, reason):
    with pytest.raises(ImageError) as info:
        decode_image(data, "photo.png")
    assert info.value.reason == reason and "photo.png" in str(info.value)


def test_truncated_files_are_corrupt():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = _encode(noisy, fmt)
        with pytest.raises(ImageError) as info:
            decode_image(data[: len(data) // 2], f"cut.{fmt}")
        assert info.value.reason == "corrupt image"


def test_decompression_bombs_are_refused():
    small = _encode(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageError, match="decompression bomb") as info:
        decode_image(small, limits=ImageLimits(max_pixels=399))
    assert info.value.reason == "decompression bomb"
    assert decode_image(small, limits=ImageLimits(max_pixels=400)).shape == (20, 20, 3)
    for side in (8_000, 40_000):  # beyond our default limit; beyond Pillow's own hard limit
        with pytest.raises(ImageError) as info:
            decode_image(_png_header_only(side, side))
        assert info.value.reason == "decompression bomb"


def test_read_image_bytes(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    assert read_image_bytes(str(path)) == b"abc" and check_image_file(str(path)) == 3
    assert read_image_bytes(f"file://{path}") == b"abc"
    for check in (read_image_bytes, check_image_file):
        with pytest.raises(ImageError, match="missing image") as info:
            check(str(tmp_path / "nope.png"))
        assert info.value.reason == "missing image"
        with pytest.raises(ImageError, match="is a directory"):
            check(str(tmp_path))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom", "fifo", "link-to-fifo"])
def test_special_files_are_refused_before_any_read(tmp_path, special):
    """A FIFO would block the open forever, /dev/zero and /dev/urandom never end: regular files only."""
    if special in ("fifo", "link-to-fifo"):
        os.mkfifo(tmp_path / "fifo")
        if special == "link-to-fifo":
            os.symlink(tmp_path / "fifo", tmp_path / "link.png")
        special = str(tmp_path / ("fifo" if special == "fifo" else "link.png"))
    for check in (read_image_bytes, check_image_file):
        with pytest.raises(ImageError, match="not a regular file") as info:
            check(special)
        assert info.value.reason == "not a regular file"


def test_byte_cap_before_reading_and_on_embedded_bytes(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"x" * 1001)
    for check in (read_image_bytes, check_image_file):
        with pytest.raises(ImageError, match="1001 bytes exceeds the limit of 1000 bytes") as info:
            check(str(path), max_bytes=1000)
        assert info.value.reason == "image file too large"
    assert read_image_bytes(str(path), max_bytes=1001) == b"x" * 1001
    with pytest.raises(ImageError, match="exceeds the limit of 1000 bytes"):
        decode_image(b"x" * 1001, limits=ImageLimits(max_bytes=1000))
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)


def test_a_fifo_swapped_in_after_the_check_cannot_block(tmp_path, monkeypatch):
    """The open is non-blocking and the descriptor is checked again: the stat/open race cannot hang a worker."""
    import gsva.images as images

    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(images, "_local_size", lambda uri, path, max_bytes: 0)  # as if the stat saw a file
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(str(fifo))
