"""Benchmark (a): batched CIM compression vs a per-image reference written the way the official code works.

Both paths take a batch of uint8 images and their 7x7 CAMs and produce the compressed images
(box at full resolution, the rest downsampled by sqrt(ratio) and back, nearest):

- batched: ``normalize_cams`` -> ``cam_to_boxes`` (vectorised over the batch) -> ``blend_compress``;
- reference: per image, a Python loop over the thresholded CAM to find the box, then PIL resize
  down and up and a paste of the box crop (as xfflzl/CIM-CIL does per image).

Prints images/s of each, the speed-up, and the share of the machine's memory bandwidth the batched
path reaches (bytes it must read and write / time, against a measured large memory copy).
Run: ``python benchmarks/compression_throughput.py [--size 224] [--batch 64] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cim_plugin.core.boxes import cam_to_boxes
from cim_plugin.core.cam import normalize_cams
from cim_plugin.core.codec import blend_compress


def reference_compress(images: np.ndarray, cams: np.ndarray, threshold: float, s: int) -> np.ndarray:
    """Per-image: upsample CAM, box by a loop over rows/cols, PIL resize down/up, paste the crop."""
    out = np.empty_like(images)
    n, h, w, _ = images.shape
    for i in range(n):
        cam = cams[i]
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
        up = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
        mask = up > threshold
        y0, y1, x0, x1 = h, 0, w, 0
        for y in range(h):
            row = mask[y]
            if row.any():
                xs = np.nonzero(row)[0]
                y0, y1 = min(y0, y), max(y1, y + 1)
                x0, x1 = min(x0, int(xs[0])), max(x1, int(xs[-1]) + 1)
        img = Image.fromarray(images[i])
        small = img.resize(((w + s - 1) // s, (h + s - 1) // s), Image.NEAREST)
        blurred = small.resize((w, h), Image.NEAREST)
        if y1 > y0:
            blurred.paste(img.crop((x0, y0, x1, y1)), (x0, y0))
        out[i] = np.asarray(blurred)
    return out


def batched_compress(images: torch.Tensor, cams: torch.Tensor, threshold: float, s: int) -> torch.Tensor:
    norm, degenerate = normalize_cams(cams)
    boxes, _ = cam_to_boxes(norm, tuple(images.shape[-2:]), threshold, s, degenerate)
    return blend_compress(images, boxes, s)


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large memory copy (read + write counted) on ``device``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), 5)
    return 2 * nbytes / t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    s = round(args.ratio ** 0.5)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    cams = F.avg_pool2d(torch.rand(args.batch, 1, 28, 28, generator=g), 4).squeeze(1)  # smooth 7x7 maps
    np_images = images.permute(0, 2, 3, 1).contiguous().numpy()
    np_cams = cams.numpy()

    ref = reference_compress(np_images, np_cams, args.threshold, s)
    dev_images, dev_cams = images.to(args.device), cams.to(args.device)
    got = batched_compress(dev_images, dev_cams, args.threshold, s).permute(0, 2, 3, 1).cpu().numpy()
    agree = float((ref == got).all(axis=(1, 2, 3)).mean())

    t_ref = timeit(lambda: reference_compress(np_images, np_cams, args.threshold, s), max(1, args.repeats // 2))
    t_bat = timeit(lambda: batched_compress(dev_images, dev_cams, args.threshold, s), args.repeats)
    moved = 2 * images.numel()  # read every pixel once, write every pixel once
    bw = copy_bandwidth(args.device)
    print(f"compression of {args.batch} images at {args.size} px, ratio {args.ratio:g}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  per-image reference (PIL + loop): {args.batch / t_ref:10.1f} images/s")
    print(f"  batched torch path:               {args.batch / t_bat:10.1f} images/s")
    print(f"  speed-up:                         {t_ref / t_bat:10.2f}x")
    print(f"  batched path moves {moved / t_bat / 1e9:.2f} GB/s = {100 * moved / t_bat / bw:.1f}% of a measured "
          f"memory copy ({bw / 1e9:.2f} GB/s)")
    print(f"  images whose output is identical in both paths: {100 * agree:.0f}%")


if __name__ == "__main__":
    main()
