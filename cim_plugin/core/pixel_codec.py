"""Entropy coding of exemplar pixels (issue: stacked memory codecs), PyCIL-free.

``encode`` / ``decode`` turn one uint8 ``[H, W, C]`` array into the bytes of a standard image file
and back, through Pillow: JPEG (``quality`` 1–95, 4:2:0 chroma subsampling as Pillow's default),
WebP (lossy, ``quality`` 1–100) or PNG (lossless; ``quality`` unused). ``raw`` is not a codec here:
raw memories store the pixels themselves (core/codec.py).

JPEG's tables (quantisation and Huffman: about 600 bytes per file, more than a 32 px image's
pixels) are the same for every colour image at one quality, so they are stored once per memory,
not per exemplar: ``encode`` returns the stream without them (SOF, SOS, entropy-coded data, EOI;
JFIF/APP segments dropped too) and ``decode`` puts the shared tables (``jpeg_tables``) back. A file
whose tables differ from the shared ones is kept whole (it starts with SOI and is decoded as is).

One image per call: Pillow encodes one image at a time. The memory calls these once per stored
exemplar when it is written and once per replayed exemplar when it is read (about 0.1–0.3 ms per
128 px image on one CPU core for JPEG).
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from .choices import PIXEL_CODECS

#: Pillow's format name of each entropy codec.
_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


def check_codec(codec: str, quality: int) -> None:
    if codec not in _FORMATS:
        raise ValueError(f"pixel codec must be one of {', '.join(c for c in PIXEL_CODECS if c != 'raw')}, got {codec!r}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 100:
        raise ValueError(f"codec quality must be an integer in [1, 100], got {quality!r}")


_SOI, _SOS = b"\xff\xd8", 0xDA
#: Segments dropped from each stored JPEG: APP0–APP15, comments (not needed to decode), and the
#: tables DQT / DHT (stored once per memory).
_TABLES, _DROPPED = (0xDB, 0xC4), tuple(range(0xE0, 0xF0)) + (0xFE,)


def _split_jpeg(data: bytes) -> tuple[bytes, bytes]:
    """(table segments, the rest from the first non-table segment to EOI) of a JPEG file."""
    if not data.startswith(_SOI):
        raise ValueError("not a JPEG stream")
    tables, i = [], 2
    rest: list[bytes] = []
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == _SOS:
            rest.append(data[i:])
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i : i + 2 + length]
        if marker in _TABLES:
            tables.append(segment)
        elif marker not in _DROPPED:
            rest.append(segment)
        i += 2 + length
    return b"".join(tables), b"".join(rest)


@functools.lru_cache(maxsize=None)
def jpeg_tables(quality: int) -> bytes:
    """The quantisation and Huffman tables every colour JPEG of this quality carries (shared)."""
    return _split_jpeg(_encode_pil(np.zeros((16, 16, 3), dtype=np.uint8), "jpeg", quality))[0]


def _encode_pil(image: np.ndarray, codec: str, quality: int) -> bytes:
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buf = io.BytesIO()
    if codec == "png":
        pil.save(buf, format="PNG", optimize=True)
    else:
        pil.save(buf, format=_FORMATS[codec], quality=int(min(quality, 95) if codec == "jpeg" else quality))
    return buf.getvalue()


def encode(image: np.ndarray, codec: str, quality: int) -> bytes:
    """The encoded bytes of a uint8 ``[H, W, C]`` image (C = 3 or 1); an empty image gives b""."""
    check_codec(codec, quality)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        return b""
    data = _encode_pil(image, codec, quality)
    if codec == "jpeg" and image.shape[2] == 3:
        tables, rest = _split_jpeg(data)
        if tables == jpeg_tables(quality):
            return rest
    return data


def decode(data: bytes | np.ndarray, shape: tuple[int, int, int], quality: int | None = None) -> np.ndarray:
    """The uint8 ``[H, W, C]`` image of ``encode``'s bytes (``shape`` checks what comes back;
    ``quality``: the JPEG quality it was encoded with, for streams stored without their tables)."""
    h, w, c = (int(v) for v in shape)
    if h == 0 or w == 0:
        return np.zeros((h, w, c), dtype=np.uint8)
    raw = bytes(data) if not isinstance(data, bytes) else data
    if not raw.startswith(_SOI) and raw[:1] == b"\xff":  # a JPEG stream without its shared tables
        if quality is None:
            raise ValueError("a JPEG stream stored without its tables needs the memory's quality to decode")
        raw = _SOI + jpeg_tables(int(quality)) + raw
    with Image.open(io.BytesIO(raw)) as img:
        arr = np.asarray(img.convert("L" if c == 1 else "RGB"))
    arr = arr[:, :, None] if c == 1 else arr
    if arr.shape != (h, w, c):
        raise ValueError(f"decoded image has shape {arr.shape}, expected {(h, w, c)} (corrupt payload?)")
    return arr
