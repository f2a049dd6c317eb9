"""Benchmark (l): MRDC's compression rate as MRDC's official code counts it, against the plugin's count.

MRDC (ICLR 2022) keeps 37 instead of 20 exemplars per class on ImageNet at JPEG quality 50 (1.85×).
Its official code (github lywang3081/MRDC, ``1_Data_Compression``) re-encodes every image file of the
dataset at the quality, at the same resolution (``skimage.io.imsave(quality=q)``, i.e. PIL with its
default chroma subsampling), and takes the rate "manually" as ``du`` of the original folder over
``du`` of the re-encoded one. So its reference exemplar is *one of the dataset's files*, already a
JPEG, while the plugin (and PyCIL's memory) counts an exemplar as raw uint8 pixels: the two rates
differ by the dataset's own compression and cannot be compared directly.

This script prints both for the same images:

- ``--folder DIR``: image files (e.g. an ImageNet class folder; searched recursively): MRDC's rate
  exactly (sum of file sizes / sum of the q-encoded sizes at the files' resolution) and the plugin's
  (raw pixels / q-encoded), and the exemplars per class each gives for ``--base`` (20) full ones.
- no folder: the synthetic set (``--size``, ``--colour``), whose images exist only as pixels. The
  "stored files" are then emulated at reference encodings: PIL's default JPEG (quality 75, 4:2:0:
  how LUCIR's ``gen_resized_imagenet.py``, which MRDC's code ships, writes the 256-px ImageNet it
  trains on) and quality 96 without chroma subsampling (the encoding most ImageNet training files
  carry, as read from their quantisation tables by a public survey of the set; not measured here).

Run: ``python benchmarks/mrdc_rate.py [--quality 50] [--folder DIR] [--size 128] [--count 100]``.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cim_plugin.data.synthetic import SyntheticSpec, load_synthetic

#: Reference encodings that emulate a dataset's stored files: (label, quality, PIL subsampling).
REFERENCES = (("PIL default (q75, 4:2:0): LUCIR/MRDC's resized ImageNet", 75, -1),
              ("q90, 4:2:0", 90, 2),
              ("q96, 4:4:4: most ImageNet originals", 96, 0))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def jpeg_bytes(image: np.ndarray, quality: int, subsampling: int = -1) -> int:
    """Bytes of ``image`` (uint8 [H, W, 3]) as a JPEG file at ``quality`` (PIL; -1 = PIL's default
    chroma subsampling for that quality, what ``skimage.io.imsave(quality=q)`` writes). Not the
    memory's ``core.pixel_codec.encode``: a file keeps its own tables (the memory shares them), the
    references need quality 96 (the memory caps JPEG at 95) and a chosen subsampling."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    return len(buf.getvalue())


def rates(reference_bytes: float, coded_bytes: float, raw_bytes: float, base: int) -> str:
    """One line: the rate against the reference and against raw pixels, and MRDC's quantity."""
    rate = reference_bytes / coded_bytes
    return (f"rate vs stored {rate:5.2f}x ({base} -> {math.floor(base * rate)} exemplars/class) | "
            f"vs raw pixels {raw_bytes / coded_bytes:5.1f}x")


def from_folder(folder: Path, quality: int, count: int, base: int) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--folder {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    files = files[:count]
    stored = coded = raw = 0
    for path in files:
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError as err:
            raise SystemExit(f"--folder: cannot read {path}: {err}") from None
        stored += path.stat().st_size
        coded += jpeg_bytes(pixels, quality)
        raw += pixels.nbytes
    print(f"{len(files)} files in {folder}: mean {stored / len(files):,.0f} bytes stored, "
          f"{coded / len(files):,.0f} at q{quality}, {raw / len(files):,.0f} raw")
    print(rates(stored, coded, raw, base))


def from_synthetic(size: int, colour: str, quality: int, count: int, base: int) -> None:
    per_class = max(1, math.ceil(count / 10))
    data = load_synthetic(SyntheticSpec(num_classes=10, image_size=size, train_per_class=per_class,
                                        test_per_class=1, colour=colour))
    images = [np.ascontiguousarray(x) for x in data.train_x[:count]]
    coded = float(np.mean([jpeg_bytes(x, quality) for x in images]))
    raw = float(images[0].nbytes)
    print(f"synthetic set, {len(images)} images of {size} px ({colour} colours): q{quality} {coded:,.0f} "
          f"bytes, raw {raw:,.0f}")
    for label, q, sub in REFERENCES:
        stored = float(np.mean([jpeg_bytes(x, q, sub) for x in images]))
        print(f"  stored as {label:<58} {stored:7,.0f} bytes: {rates(stored, coded, raw, base)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", type=int, default=50, help="MRDC's quality (default 50, the paper's ImageNet choice)")
    p.add_argument("--folder", type=Path, help="a folder of image files (the dataset's own encoding is the reference)")
    p.add_argument("--size", type=int, default=128, help="synthetic image side (default 128, the demo's)")
    p.add_argument("--colour", default="random", help="synthetic_colour (default random, the demo's)")
    p.add_argument("--count", type=int, default=100, help="images to measure (default 100)")
    p.add_argument("--base", type=int, default=20, help="full exemplars per class of the reference (MRDC: 20)")
    a = p.parse_args()
    if not 1 <= a.quality <= 100:
        raise SystemExit(f"--quality {a.quality}: must be in 1..100")
    if a.folder is not None:
        if not a.folder.is_dir():
            raise SystemExit(f"--folder {a.folder}: not a folder")
        from_folder(a.folder, a.quality, a.count, a.base)
    else:
        from_synthetic(a.size, a.colour, a.quality, a.count, a.base)


if __name__ == "__main__":
    main()
