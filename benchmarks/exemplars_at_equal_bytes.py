"""Benchmark (d): exemplars per class at equal bytes, per memory codec, on the synthetic set.

No training: each class's training images are stored, in data order, into a memory with the demo's
budget (5 full-exemplar units per class, i.e. 5 × 128·128·3 bytes) until the budget is spent, and
the script prints how many fit (at most the 60 candidates), the capacity the budget would have
(full bytes / mean bytes per exemplar), the mean bytes per exemplar, the PSNR of what is stored against the
original, and the multiple of plugin-off's 5 exemplars per class. Memories:

- ``full``: whole images, raw pixels (plugin off, through the plugin's memory);
- ``mrdc``: whole images as JPEG (MRDC; ``--qualities``);
- ``uniform``: the whole image downsampled by sqrt(ratio), raw and as JPEG;
- ``oracle``: the true object box (grid-aligned) kept, the rest downsampled — raw and + JPEG;
- ``pau-sized``: the true box grown about its centre to the mean box area CIM's pau reached on the
  demo (``--box-area``, 0.29: docs/results.md), raw and + JPEG — what a CAM box of that size costs.

Also the time to decode one stored exemplar as replay does (one item per call): multiply by the
exemplars replayed per epoch and compare with an epoch's wall time (README: about 15 s per iCaRL
epoch of the demo on 2 cores).

Run: ``python benchmarks/exemplars_at_equal_bytes.py [--size 128] [--ratio 4] [--qualities 30 50 75 90]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cim_plugin.core.boxes import align_boxes
from cim_plugin.core.codec import downsample_factor
from cim_plugin.core.diagnostics import image_mse, psnr_db
from cim_plugin.core.herding import fit_prefix
from cim_plugin.core.memory import make_memory
from cim_plugin.data.synthetic import SyntheticSpec, load_synthetic


def grown(boxes: np.ndarray, area: float, size: int) -> np.ndarray:
    """Each box scaled about its centre to ``area`` × the image (never smaller than the box)."""
    b = boxes.astype(np.float64)
    h, w = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
    k = np.maximum(1.0, np.sqrt(area * size * size / np.maximum(h * w, 1)))
    cy, cx = (b[:, 0] + b[:, 1]) / 2, (b[:, 2] + b[:, 3]) / 2
    out = np.stack([cy - h * k / 2, cy + h * k / 2, cx - w * k / 2, cx + w * k / 2], axis=1)
    return np.clip(np.rint(out), 0, size).astype(np.int64)


def fill(images: np.ndarray, labels: np.ndarray, boxes: np.ndarray, ratio: float, codec: str, quality: int,
         units: float) -> dict:
    size = images.shape[1]
    counts, sizes, mses, decode_s = [], [], [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        mem = make_memory((size, size, 3), ratio, codec, quality)
        kept = mem.add_class(int(label), images[idx], boxes[idx], budget=units)
        counts.append(kept)
        store = mem.summary()
        sizes.append(store["bytes_used"] / max(kept, 1))
        mses.append(float(image_mse(torch.from_numpy(images[idx[:kept]]), torch.from_numpy(mem.images(int(label)))).mean()))
        t0 = time.perf_counter()
        for i in range(kept):  # replay decodes one exemplar per item drawn
            mem.images(int(label), np.array([i]))
        decode_s.append((time.perf_counter() - t0) / max(kept, 1))
    return {"per_class": float(np.mean(counts)), "bytes": float(np.mean(sizes)), "psnr": psnr_db(float(np.mean(mses))),
            "decode_ms": 1000 * float(np.median(decode_s))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--units", type=float, default=5.0, help="budget per class in full-exemplar units")
    p.add_argument("--qualities", type=int, nargs="+", default=[30, 50, 75, 90])
    p.add_argument("--box-area", type=float, default=0.29)
    args = p.parse_args(argv)
    data = load_synthetic(SyntheticSpec(num_classes=10, image_size=args.size, train_per_class=60, test_per_class=20))
    images, labels, size = data.train_x, data.train_y, args.size
    s = downsample_factor(args.ratio)
    align = lambda b: align_boxes(torch.from_numpy(b), (size, size), s).numpy()  # noqa: E731
    box_sets = {
        "full": np.tile(np.array([[0, size, 0, size]]), (len(images), 1)),
        "uniform": np.zeros((len(images), 4), dtype=np.int64),
        "oracle": align(data.train_boxes),
        "pau-sized": align(grown(data.train_boxes, args.box_area, size)),
    }
    full_bytes = size * size * 3
    print(f"synthetic set, {size} px, {len(np.unique(labels))} classes x 60 images; budget {args.units:g} units "
          f"= {int(args.units * full_bytes):,} bytes per class; compress_ratio {args.ratio:g}")
    for name, boxes in box_sets.items():
        area = float(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).mean()) / (size * size)
        print(f"\n{name} boxes (mean area {area:.3f}):")
        rows = [("raw", 0)] + [("jpeg", q) for q in args.qualities]
        for codec, q in rows:
            r = fill(images, labels, boxes, args.ratio, codec, q or 50, args.units)
            label = "raw" if codec == "raw" else f"jpeg q{q}"
            name_shown = "mrdc" if (name == "full" and codec == "jpeg") else name
            psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.1f}"
            print(f"  {name_shown:10s} {label:9s} {r['per_class']:5.1f} exemplars/class stored ({r['per_class'] / args.units:5.2f}x off; "
                  f"capacity {full_bytes / r['bytes']:6.2f}x = full bytes / bytes each), {r['bytes']:8.0f} B each, PSNR {psnr} dB, "
                  f"decode {r['decode_ms']:.2f} ms each")
    print("\nA class has 60 candidates, so 12x is the most this set can store; 'capacity' is what the byte budget "
          "would hold. The synthetic images are smooth renderings: JPEG codes them far better than photos "
          "(expect several times fewer bytes per image than on ImageNet).")


if __name__ == "__main__":
    main()
