"""THE image decoder: every encoded image that anyone decodes (the reader, the shard writer's
statistics, `verify --deep`, `index`, predict and serve) goes through `Encoded`.

- The format is sniffed from the bytes, never taken from a file name or member extension, and
  only JPEG, PNG and WebP are ever decoded: PIL opens dozens of formats, some with a history of
  exploits (and EPS runs Ghostscript). Anything else raises `UnsupportedFormat` (serve: 415).
- The size is read from the header and refused above MAX_PIXELS before a pixel is decoded: a
  140 kB PNG can claim 12000x12000 pixels.
- A JPEG's header and pixels are read by simplejpeg (libjpeg-turbo; its header read is ~100x
  cheaper than PIL's Image.open), at 1/2, 1/4 or 1/8 size when the caller allows it; PIL
  decodes what simplejpeg refuses (CMYK, unusual markers) and the other two formats.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP")  # what is ever decoded (PIL format names)
# One limit for every caller: an image whose header promises more pixels is refused before
# decoding (PIL itself warns at 89M and refuses at 179M). 64 Mpx of RGB decode to 192 MiB.
MAX_PIXELS = 1 << 26


class UnsupportedFormat(ValueError):
    """The bytes are not a JPEG, PNG or WebP image (BMP, TIFF, GIF, EPS, text, ...)."""


def sniff(data: bytes) -> str:
    """The PIL format name of an encoded image, from its first bytes; UnsupportedFormat for
    anything but JPEG, PNG and WebP."""
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    foreign = foreign_format(data)
    what = f"a {foreign} image" if foreign else f"{len(data)} bytes starting {data[:8]!r}"
    raise UnsupportedFormat(f"not an image in a format decoded here (JPEG, PNG or WebP): {what}")


def foreign_format(data: bytes) -> str:
    """The PIL name of a format we do not decode, from its magic bytes alone (PIL's `accept`
    checks of the prefix: no plugin parses anything), else ""."""
    Image.init()
    prefix = data[:64]
    return next((fmt for fmt, (_, accept) in Image.OPEN.items() if accept and accept(prefix)), "")


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """ValueError for a header size above `max_pixels`, before anything is decoded."""
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} pixels, more than the {max_pixels:,} allowed: refused before decoding")


class Encoded:
    """One encoded image with its header read: `format` (sniffed), `size` (width, height),
    checked against `max_pixels` (serve sets a lower budget). ValueError (UnsupportedFormat for a
    foreign format) when the bytes are not a decodable image; `array` decodes."""

    def __init__(self, data: bytes, max_pixels: int = MAX_PIXELS):
        self.data, self.image = data, None
        self.format = sniff(data)
        header = _jpeg_header(data) if self.format == "JPEG" else None
        if header is None:
            self.image = _open(data, self.format)  # reads the header only
            header = self.image.size
        self.size = header
        check_size(*self.size, max_pixels)

    @classmethod
    def from_array(cls, array: np.ndarray) -> "Encoded":
        """An already decoded HWC uint8 image (raw shard members) behind the same interface."""
        self = cls.__new__(cls)
        self.data, self.format = None, "raw"
        self.image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        self.size = self.image.size
        return self

    def pil(self) -> Image.Image:
        """PIL's (lazy) image of these bytes, opened by the one plugin of their format."""
        if self.image is None:
            self.image = _open(self.data, self.format)
        return self.image

    def array(self, mode: str, scale: int = 1) -> np.ndarray:
        """HWC uint8 in `mode` (L or RGB), downscaled by `scale` (1, 2, 4, 8) when it is a JPEG."""
        width, height = self.size
        try:
            if self.image is None:
                try:
                    array = simplejpeg.decode_jpeg(self.data, "rgb" if mode == "RGB" else "gray",
                                                   min_height=-(-height // scale) if scale > 1 else 0,
                                                   min_width=-(-width // scale) if scale > 1 else 0)
                    return array if array.ndim == 3 else array[:, :, None]
                except ValueError:
                    self.pil()
            if scale > 1 and self.format == "JPEG":
                self.image.draft(mode, (width // scale, height // scale))
            return image_array(self.image, mode)
        except ValueError:
            raise
        except Exception as e:  # PIL raises many types for truncated or corrupt data
            raise ValueError(f"cannot decode image ({self.format}): {' '.join(str(e).split())}") from None


def decode(data: bytes, mode: str) -> np.ndarray:
    """HWC uint8 in `mode` of an encoded JPEG, PNG or WebP (the checks of `Encoded`)."""
    return Encoded(data).array(mode)


def image_array(image: Image.Image, mode: str) -> np.ndarray:
    """HWC uint8 (writable) of a PIL image in `mode` (L or RGB); decodes a lazily opened one."""
    if image.mode != mode:
        image = image.convert(mode)
    array = np.array(image)
    return array[:, :, None] if array.ndim == 2 else array


def _open(data: bytes, fmt: str) -> Image.Image:
    """PIL's lazy image of `data`, by the one plugin of its sniffed format."""
    try:
        return Image.open(io.BytesIO(data), formats=(fmt,))
    except Exception as e:  # PIL raises many types for bad data; callers want one
        raise ValueError(f"cannot decode image ({fmt}): {' '.join(str(e).split())}") from None


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg reads, else None (PIL then tries)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height
