"""Odd, broken and malicious images for the hostile-input suite (built in memory, deterministic, no files).

`VALID` are odd-but-valid images the server must answer with 200; `BROKEN` must get a 400 (or 413) and never a 5xx;
`bombs(...)` are small files whose headers claim more pixels than any sane cap.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image


def save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.frombytes(mode, (width, height), rng.integers(0, 256, width * height * len(mode), np.uint8).tobytes())


def png(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    return save(noise(width, height, seed), "PNG")


def jpeg(width: int = 48, height: int = 40, seed: int = 0, **kwargs: object) -> bytes:
    return save(noise(width, height, seed), "JPEG", quality=80, **kwargs)


# ------------------------------------------------------------------------------------------- hand-written PNGs
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, *, bit_depth: int, color_type: int, rows: Callable[[], bytes] | None = None,
            row_bytes: int | None = None, extra_chunks: tuple[bytes, ...] = ()) -> bytes:
    """A PNG written chunk by chunk; with `row_bytes` the image data is `height` zero rows compressed in a stream
    (a genuine decompression bomb never materialised here), else `rows()` gives the raw scanlines."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if rows is not None:
        idat = zlib.compress(rows(), 9)
    else:
        assert row_bytes is not None
        comp = zlib.compressobj(9)
        line = bytes(1 + row_bytes)  # filter byte 0 + zero pixels
        block = line * max(1, (1 << 20) // len(line))
        lines_per_block = len(block) // len(line)
        parts, left = [], height
        while left > 0:
            n = min(left, lines_per_block)
            parts.append(comp.compress(block if n == lines_per_block else line * n))
            left -= n
        parts.append(comp.flush())
        idat = b"".join(parts)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra_chunks) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height zeros: a few KB that decode to width*height pixels."""
    return raw_png(width, height, bit_depth=1, color_type=0, row_bytes=(width + 7) // 8)


def png_header_only(width: int, height: int) -> bytes:
    """Signature + IHDR claiming a huge RGB image, and an IDAT of a few bytes: the header alone must refuse it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(
        b"IEND", b"")


def png_rgb16(width: int = 20, height: int = 12) -> bytes:
    """48-bit RGB (16 bits per channel), which Pillow reads as 8-bit RGB."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 65536, (height, width * 3), dtype=np.uint16).astype(">u2").tobytes()
    stride = width * 6
    return raw_png(width, height, bit_depth=16, color_type=2,
                   rows=lambda: b"".join(b"\0" + pixels[i * stride:(i + 1) * stride] for i in range(height)))


def png_text_bomb() -> bytes:
    """A small valid PNG carrying a zTXt chunk that inflates to 64 MB of text."""
    comp = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    blob = b"".join(comp.compress(zeros) for _ in range(64)) + comp.flush()
    ztxt = _chunk(b"zTXt", b"Comment\0\0" + blob)
    return raw_png(8, 8, bit_depth=8, color_type=0, rows=lambda: b"".join(b"\0" + bytes(8) for _ in range(8)),
                   extra_chunks=(ztxt,))


# ------------------------------------------------------------------------------------------- other containers
def jpeg_header_bomb(width: int = 65500, height: int = 65500) -> bytes:
    """A real small JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(jpeg(16, 16))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def gif_header_bomb() -> bytes:
    """A GIF whose logical screen is 65535 x 65535 around a 1x1 frame."""
    data = bytearray(save(Image.new("P", (1, 1)), "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)
    return bytes(data)


def tiff_header_bomb() -> bytes:
    """A small TIFF whose ImageWidth / ImageLength tags claim 100000 x 100000."""
    data = bytearray(save(Image.new("L", (4, 4)), "TIFF"))
    count = struct.unpack_from("<H", data, struct.unpack_from("<I", data, 4)[0])[0]
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            if kind == 3:  # SHORT: the largest value it can carry
                struct.pack_into("<H", data, entry + 8, 65535)
            else:
                struct.pack_into("<I", data, entry + 8, 100_000)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("P", (24, 24), i * 40) for i in range(4)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def animated_png() -> bytes:
    frames = [noise(24, 24, seed=i) for i in range(3)]
    return save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)


def animated_webp() -> bytes:
    frames = [noise(24, 24, seed=i) for i in range(3)]
    return save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(noise(40, 20, seed=5), "JPEG", exif=exif.tobytes())


def palette_png(transparent: bool = False) -> bytes:
    image = noise(30, 20, seed=6).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return save(image, "PNG", transparency=0) if transparent else save(image, "PNG")


def gray16_png() -> bytes:
    values = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 85).astype(np.uint16)
    return save(Image.fromarray(values), "PNG")


def _make_valid() -> dict[str, bytes]:
    return {
        "1x1 png": save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "1x1 gif": save(Image.new("P", (1, 1)), "GIF"),
        "10000x1 png": save(noise(10000, 1, seed=1), "PNG"),
        "1x10000 png": save(noise(1, 10000, seed=2), "PNG"),
        "5000x3 jpeg": jpeg(5000, 3, seed=3),
        "16-bit gray png": gray16_png(),
        "16-bit rgb png": png_rgb16(),
        "cmyk jpeg": save(noise(32, 24, seed=7, mode="CMYK"), "JPEG"),
        "gray jpeg": save(noise(32, 24, seed=8, mode="L"), "JPEG"),
        "progressive jpeg": jpeg(64, 48, seed=9, progressive=True),
        "exif-rotated jpeg": exif_rotated_jpeg(),
        "palette png": palette_png(),
        "palette png transparency": palette_png(transparent=True),
        "rgba png": save(noise(30, 20, seed=10, mode="RGBA"), "PNG"),
        "la png": save(noise(30, 20, seed=11, mode="LA"), "PNG"),
        "1-bit png": save(noise(30, 20, seed=12, mode="L").convert("1"), "PNG"),
        "int32 tiff": save(Image.fromarray(np.arange(400, dtype=np.int32).reshape(20, 20) * 9000), "TIFF"),
        "float tiff": save(Image.fromarray(np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)),
                           "TIFF"),
        "animated gif": animated_gif(),
        "animated png": animated_png(),
        "webp": save(noise(30, 20, seed=13), "WEBP"),
        "animated webp": animated_webp(),
        "bmp": save(noise(30, 20, seed=14), "BMP"),
        "tiff": save(noise(30, 20, seed=15), "TIFF"),
    }


def _make_broken() -> dict[str, bytes]:
    rng = random.Random(7)
    good_png, good_jpeg = png(64, 64, seed=20), jpeg(64, 64, seed=21)
    return {
        "random bytes": bytes(rng.getrandbits(8) for _ in range(3000)),
        "png magic + random": b"\x89PNG\r\n\x1a\n" + bytes(rng.getrandbits(8) for _ in range(500)),
        "png signature only": b"\x89PNG\r\n\x1a\n",
        "jpeg soi only": b"\xff\xd8\xff",
        "gif header only": b"GIF89a",
        "truncated png": good_png[: len(good_png) // 2],
        "truncated jpeg": good_jpeg[: len(good_jpeg) // 2],
        "png bad crc": good_png[:30] + bytes([good_png[30] ^ 0xFF]) + good_png[31:],
        "zero-size png": raw_png(0, 0, bit_depth=8, color_type=0, rows=lambda: b""),
        "text": b"hello, this is not an image\n" * 10,
        "html": b"<!doctype html><html><body><img src=x></body></html>",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "ico": save(noise(16, 16, seed=22), "ICO"),
        "png text bomb": png_text_bomb(),
    }


VALID = _make_valid()
BROKEN = _make_broken()


def bombs() -> dict[str, bytes]:
    """Tiny files whose headers claim > 100 M pixels (one real PNG bomb: 20000 x 20000 zeros in ~60 KB)."""
    return {
        "png bomb 20000x20000": png_bomb(20000, 20000),
        "png header 100000x100000": png_header_only(100_000, 100_000),
        "jpeg header 65500x65500": jpeg_header_bomb(),
        "gif screen 65535x65535": gif_header_bomb(),
        "tiff header 65535x65535": tiff_header_bomb(),
    }
