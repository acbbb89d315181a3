"""Input image fetching and normalisation (batch.run.inputs): every common kind decodes to the right RGB, and
every bad kind fails with its reason."""

from __future__ import annotations

import io
import os

import fsspec
import numpy as np
import pytest
from PIL import Image

from batch.run.inputs import ImageError, fetch_image


def save(tmp_path, name: str, img: Image.Image, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


def test_rgb_png_round_trips_exactly_with_info(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    uri = save(tmp_path, "a.png", Image.fromarray(arr))
    rgb, info = fetch_image(uri)
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 20, 3)
    np.testing.assert_array_equal(rgb, arr)
    import hashlib

    assert info["input_sha256"] == hashlib.sha256(open(uri, "rb").read()).hexdigest()
    assert (info["input_width"], info["input_height"], info["input_mode"], info["input_format"]) == (20, 12, "RGB", "PNG")


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[0, :, 3] = 0  # fully transparent row -> white
    rgba[1, :, 3] = 255  # opaque row -> the colour
    rgba[2, :, 3] = 128  # half -> mix
    rgb, info = fetch_image(save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert info["input_mode"] == "RGBA"
    np.testing.assert_array_equal(rgb[0], np.full((4, 3), 255))
    np.testing.assert_array_equal(rgb[1], np.tile([200, 0, 0], (4, 1)))
    a = 128 / 255
    expect = np.round([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    np.testing.assert_array_equal(rgb[2], np.tile(expect, (4, 1)))


def test_la_and_transparent_palette_are_composited_on_white(tmp_path):
    la = Image.fromarray(np.stack([np.full((3, 3), 10, np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    rgb, _ = fetch_image(save(tmp_path, "la.png", la))
    assert (rgb == 255).all()
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    rgb, info = fetch_image(save(tmp_path, "p.png", pal, transparency=0))
    assert info["input_mode"] == "P"
    assert tuple(rgb[1, 1]) == (255, 0, 0) and tuple(rgb[0, 0]) == (255, 255, 255)


def test_grayscale_palette_and_bilevel_become_rgb(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgb, _ = fetch_image(save(tmp_path, "g.png", Image.fromarray(gray, "L")))
    np.testing.assert_array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    rgb, info = fetch_image(save(tmp_path, "p.png", pal))
    assert info["input_mode"] == "P" and (rgb == (10, 20, 30)).all()
    rgb, _ = fetch_image(save(tmp_path, "b.png", Image.new("1", (3, 2), 1)))
    assert rgb.shape == (2, 3, 3) and (rgb == 255).all()


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)  # mode I;16
    rgb, info = fetch_image(save(tmp_path, "g16.png", img))
    assert info["input_mode"].startswith("I")
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    rgb, info = fetch_image(save(tmp_path, "c.jpg", cmyk, quality=95))
    assert info["input_mode"] == "CMYK" and rgb.shape == (8, 8, 3)
    r, g, b = rgb[4, 4].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    uri = save(tmp_path, "r.jpg", Image.fromarray(arr), exif=exif, quality=95)
    rgb, info = fetch_image(uri)
    assert rgb.shape == (40, 20, 3) and (info["input_width"], info["input_height"]) == (20, 40)
    top, bottom = rgb[5, 10].astype(int), rgb[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_memory_uri_is_read_through_fsspec():
    buf = io.BytesIO()
    Image.new("RGB", (5, 6), (1, 2, 3)).save(buf, format="PNG")
    fsspec.filesystem("memory").pipe("/sdbatch-test-images/a.png", buf.getvalue())
    rgb, info = fetch_image("memory://sdbatch-test-images/a.png")
    assert rgb.shape == (6, 5, 3) and (rgb == (1, 2, 3)).all()


@pytest.mark.parametrize("kind, reason", [
    ("missing", "not found"),
    ("empty", "empty file (0 bytes)"),
    ("garbage", "not a decodable image"),
    ("truncated", "corrupt image data"),
    ("directory", "is a directory"),
    ("too_big", "over limits.max_input_pixels=5000"),
    ("fifo", "not a regular file"),
    ("too_many_bytes", "over limits.max_input_bytes=1000, got "),
])
def test_bad_images_fail_with_their_reason(tmp_path, kind, reason):
    path = tmp_path / "x.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(buf, format="PNG")
    good = buf.getvalue()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "too_big":
        path.write_bytes(good)  # 100 x 100 = 10000 pixels
    elif kind == "fifo":  # opening a FIFO for reading blocks until a writer appears: it must never be opened
        os.mkfifo(path)
    elif kind == "too_many_bytes":
        path.write_bytes(good)
    with pytest.raises(ImageError) as err:
        fetch_image(str(path), max_pixels=5000 if kind == "too_big" else 10**6,
                    max_bytes=1000 if kind == "too_many_bytes" else 10**8)
    # the reason is stable text (its variable part after ", got"); the URI is the row's image_uri column, not
    # part of the reason, so `sdbatch status` groups the failures by reason
    assert reason in str(err.value) and str(path) not in str(err.value)


def test_byte_limit_is_checked_from_the_size_before_reading(tmp_path, monkeypatch):
    """A file over limits.max_input_bytes fails from its stored size: not one byte of it is read."""
    import fsspec.implementations.local as local

    path = tmp_path / "huge.png"
    with open(path, "wb") as f:  # 3 GiB, sparse: costs no disk
        f.truncate(3 * 1024**3)

    def no_open(*args, **kwargs):
        raise AssertionError("opened an over-limit file")

    monkeypatch.setattr(local.LocalFileSystem, "_open", no_open)
    with pytest.raises(ImageError, match=r"over limits.max_input_bytes=134217728, got 3221225472 bytes"):
        fetch_image(str(path))


def test_slow_read_fails_after_the_timeout(tmp_path, monkeypatch):
    """A read still going after limits.input_read_timeout_s fails its image (checked between chunks)."""
    import batch.run.inputs as inputs

    path = tmp_path / "a.png"
    path.write_bytes(b"x" * 100)
    monkeypatch.setattr(inputs, "_CHUNK", 10)
    clock = iter(range(0, 10**6, 7))  # every call 7 "seconds" later
    monkeypatch.setattr(inputs.time, "monotonic", lambda: next(clock))
    with pytest.raises(ImageError, match=r"read not finished within limits.input_read_timeout_s=20"):
        fetch_image(str(path), timeout_s=20)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    """A header that declares a huge image is refused without decoding the pixel data."""
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 4000)).save(path)  # small file (compresses well), 16 Mpx declared
    from PIL import ImageFile

    def no_load(self):  # decoding would be a bug
        raise AssertionError("decoded an over-limit image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(ImageError, match="over limits.max_input_pixels=1000000, got 4000x4000 = 16000000 pixels"):
        fetch_image(str(path), max_pixels=1_000_000)
