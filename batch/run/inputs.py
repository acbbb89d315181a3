"""Input images for the image tasks: the CPU fetch stage, and reading one URI (guard, decode, normalise to RGB).

:func:`fetch_inputs` is the stage before the sampler for tasks with ``input_image`` (``batch.tasks``): it
fetches each item's ``image_uri`` once per distinct URI and passes raw RGB pixels on in an ``_input``
column; an image that cannot be used marks its item ``failed`` with ``image_uri: <reason>``. The samplers
never read storage.

:func:`fetch_image` is the single place where sdbatch reads an input image (every read goes through it,
so location checks belong here). It returns an (H, W, 3) uint8 RGB array and facts about the input:

1. read the object's bytes with fsspec (any URI: local path, ``file://``, ``s3://``, ``gs://``,
   ``memory://``), bounded: regular files only (a FIFO or device would block the stage), a byte limit
   checked from the stored size before reading, a read timeout; a missing object or a zero-byte file is
   an :class:`ImageError`;
2. hash the bytes (``input_sha256``) and parse only the header; more than ``max_pixels`` pixels
   (the spec's ``limits.max_input_pixels``, a decompression-bomb guard) is refused *before* decoding;
3. decode fully (a truncated or corrupt file fails here), then apply the EXIF orientation tag;
4. normalise the colour mode:

   * transparency (RGBA, LA, PA, palette with a transparent index) is composited over **white**
     (alpha-weighted: ``rgb * a + 255 * (1 - a)``), the usual convention for photos with cut-outs;
   * 16-bit (``I;16*``) and 32-bit integer grayscale are scaled from 0..65535 to 0..255
     (``round(v / 257)``); float (``F``) images are clipped to 0..255;
   * grayscale, bilevel, palette, CMYK (PIL's conversion, no ICC colour management), YCbCr, LAB and
     HSV are converted to RGB with Pillow.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from batch.plan.batches import pack_batches, unpack_batches
from batch.store.io import error_text
from batch.store.schema import set_column as _set_column


class ImageError(ValueError):
    """An input image that cannot be used; the message is the row's failure reason."""


def fetch_image(uri: str, storage_options: dict[str, Any] | None = None,
                max_pixels: int = 16_777_216, allowed: list[str] | None = None,
                max_bytes: int = 128 * 1024 * 1024, timeout_s: float = 60.0) -> tuple[np.ndarray, dict[str, Any]]:
    """Read, check and decode the image at ``uri``; return ``(rgb uint8 HxWx3, info)``.

    ``info`` has ``input_sha256`` (of the stored bytes), ``input_width``/``input_height`` (after EXIF
    rotation, i.e. of the returned array), ``input_mode`` (Pillow's mode of the file) and ``input_format``.
    Raises :class:`ImageError` with a short reason for a missing, empty, corrupt or oversized image, or
    (``allowed`` given: see :mod:`batch.plan.locations`) one outside the allowed input locations. Reads are
    bounded: regular files (objects) only, at most ``max_bytes`` (judged from the stored size before reading,
    and counted while reading), finished within ``timeout_s`` (checked between chunks). The reason never holds
    the URI itself (the row's ``image_uri`` column does), so failures group by reason.
    """
    data = _read(uri, storage_options or {}, allowed, max_bytes, timeout_s)
    if not data:
        raise ImageError("empty file (0 bytes)")
    info: dict[str, Any] = {"input_sha256": hashlib.sha256(data).hexdigest()}
    img = _decode(data, max_pixels)
    info["input_mode"], info["input_format"] = img.mode, img.format
    rgb = _to_rgb(img)
    info["input_height"], info["input_width"] = int(rgb.shape[0]), int(rgb.shape[1])
    return rgb, info


_CHUNK = 4 * 1024 * 1024


def _read(uri: str, storage_options: dict[str, Any], allowed: list[str] | None = None,
          max_bytes: int = 128 * 1024 * 1024, timeout_s: float = 60.0) -> bytes:
    import fsspec

    from batch.plan.locations import InputLocationError, check_input_uri

    if not isinstance(uri, str) or not uri:
        raise ImageError(f"must be a non-empty URI string, got {uri!r}")
    if allowed is not None:  # checked again where the bytes are read (the plan checked it too)
        try:
            uri = check_input_uri(uri, allowed)
        except InputLocationError as err:
            raise ImageError(str(err)) from None
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except Exception as err:  # unknown protocol, missing driver, bad options
        raise ImageError(f"cannot open, got {type(err).__name__}: {err}") from None
    try:
        # 1. what the object is, from its metadata alone: a FIFO, device or socket would block or never end
        info = fs.info(path)
        kind = info.get("type")
        if kind == "directory":
            raise ImageError("is a directory, not an image")
        if kind != "file":
            raise ImageError(f"not a regular file, got type {kind!r}")
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise ImageError(f"over limits.max_input_bytes={max_bytes}, got {size} bytes")
        # 2. read in chunks, bounded in bytes (a size that lied) and in time
        deadline = time.monotonic() + timeout_s
        chunks, total = [], 0
        with fs.open(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"over limits.max_input_bytes={max_bytes}, got more while reading")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise ImageError(f"read not finished within limits.input_read_timeout_s={timeout_s:g}, "
                                     f"got {total} bytes")
        return b"".join(chunks)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("not found") from None
    except Exception as err:
        raise ImageError(f"cannot read, got {type(err).__name__}: {err}") from None


def _decode(data: bytes, max_pixels: int):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"over the pixel limit, got {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not a decodable image (unknown or corrupt header)") from None
    except Exception as err:
        raise ImageError(f"not a decodable image, got {type(err).__name__}: {err}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"over limits.max_input_pixels={max_pixels}, got {w}x{h} = {w * h} pixels")
    if w < 1 or h < 1:
        raise ImageError(f"has no pixels, got {w}x{h}")
    try:
        img.load()
        fmt = img.format
        img = ImageOps.exif_transpose(img)  # rotates/flips per the EXIF Orientation tag, drops the tag
        img.format = fmt
    except Exception as err:  # truncated file, bad compressed stream
        raise ImageError(f"corrupt image data, got {type(err).__name__}: {err}") from None
    return img


def _to_rgb(img) -> np.ndarray:
    """Normalise a decoded Pillow image of any mode to (H, W, 3) uint8 RGB (rules in the module docstring)."""
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        a = rgba[..., 3:4] / 255.0
        out = rgba[..., :3] * a + 255.0 * (1.0 - a)  # composite over white
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        gray = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.round(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def fetch_inputs(batch: pa.Table, storage_options: dict[str, Any], max_pixels: int,
                 allowed: list[str] | None = None, max_bytes: int = 128 * 1024 * 1024,
                 timeout_s: float = 60.0) -> pa.Table:
    """CPU stage: fetch each item's input image once per distinct URI in the batch; add ``_input`` (raw
    uint8 RGB bytes), ``input_sha256``/``input_width``/``input_height``/``input_mode``, ``status``, ``error``."""
    uris = batch.column("image_uri").to_pylist()
    cache: dict[str, tuple[bytes | None, dict[str, Any], str | None]] = {}
    for uri in dict.fromkeys(uris):
        try:
            rgb, info = fetch_image(uri, storage_options, max_pixels, allowed, max_bytes, timeout_s)
            cache[uri] = (np.ascontiguousarray(rgb).tobytes(), info, None)
        except ImageError as err:
            cache[uri] = (None, {}, f"image_uri: {err}")
        except Exception as err:  # anything unexpected still fails only this image
            cache[uri] = (None, {}, f"image_uri: {error_text(err)}")
    cols: dict[str, list] = {k: [] for k in ("_input", "input_sha256", "input_width", "input_height", "input_mode",
                                             "status", "error")}
    for uri in uris:
        data, info, err = cache[uri]
        cols["_input"].append(data)
        for k in ("input_sha256", "input_width", "input_height", "input_mode"):
            cols[k].append(info.get(k))
        cols["status"].append("ok" if err is None else "failed")
        cols["error"].append(err)
    out = batch
    for name, type_ in (("_input", pa.binary()), ("input_sha256", pa.string()), ("input_width", pa.int32()),
                        ("input_height", pa.int32()), ("input_mode", pa.string()), ("status", pa.string()),
                        ("error", pa.string())):
        out = _set_column(out, name, cols[name], type_)
    return out


def fetch_packed_inputs(packed: pa.Table, **kwargs: Any) -> pa.Table:
    """:func:`fetch_inputs` over whole GPU batches packed one per row (:func:`batch.plan.batches.pack_batches`)."""
    return pack_batches(fetch_inputs(unpack_batches(packed), **kwargs))
