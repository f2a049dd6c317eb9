"""Benchmark (a): batched CIM compression vs a per-image reference written the way the official code works.

Both paths take a batch of uint8 images and their 7x7 CAMs and produce the compressed images
(box at full resolution, the rest downsampled by sqrt(ratio) and back, nearest):

- batched: ``normalize_cams`` -> ``cam_to_boxes`` (vectorised over the batch) -> ``blend_compress``;
- reference: per image, as xfflzl/CIM-CIL does (models/base.py ``_gen_bbx``, utils/transform.py
  ``BbxBlur``): min-max normalise the CAM, ``F.interpolate`` it (bilinear) to the image size,
  threshold, find the box by a Python loop over the rows, then PIL resize down and up (nearest)
  and paste the box crop. It runs with one torch thread: its per-image ``F.interpolate`` gains
  nothing from more, and on a loaded machine OpenMP barriers would slow it several-fold.

Prints images/s of each, the speed-up, the share of the machine's memory bandwidth the batched
path reaches (the least traffic it must cause -- every pixel read once and written once -- over
its time, against a measured large memory copy), and how far the outputs agree.

The outputs cannot all agree, by design of the plugin's storage format: PIL's NEAREST resize
samples each s x s cell at its centre (pixel ``s*i + s//2``), the plugin stores ``x[::s, ::s]``,
and the plugin grows each box outward to the s-grid so that stored cells lie wholly inside or
outside it. So the script also checks each stage separately: the CAM boxes (the reference box
grown to the grid must equal the batched box) and the output against the same per-image loop on
the plugin's grid (not timed).

Run: ``python benchmarks/compression_throughput.py [--size 224] [--batch 64] [--device cpu|cuda]
[--threads N]``. Timings are the best of ``--repeats`` runs; on a shared machine run it a few
times (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cim_plugin.core.boxes import align_boxes, cam_to_boxes
from cim_plugin.core.cam import normalize_cams
from cim_plugin.core.codec import blend_compress


def _loop_box(cam: torch.Tensor, size: tuple[int, int], threshold: float) -> tuple[int, int, int, int]:
    """Official steps for one CAM: normalise, bilinear upsample, threshold, box by a row loop."""
    h, w = size
    cam = cam - cam.min()
    cam = cam / cam.max()
    up = F.interpolate(cam[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    mask = up > threshold
    y0, y1, x0, x1 = h, 0, w, 0
    for y in range(h):
        row = mask[y]
        if row.any():
            xs = np.nonzero(row)[0]
            y0, y1 = min(y0, y), max(y1, y + 1)
            x0, x1 = min(x0, int(xs[0])), max(x1, int(xs[-1]) + 1)
    return (y0, y1, x0, x1) if y1 > y0 else (0, 0, 0, 0)


def reference_compress(images: np.ndarray, cams: torch.Tensor, threshold: float, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, as the official code: loop box, PIL NEAREST resize down and up, paste the crop.

    Returns ``(compressed uint8 [B, H, W, C], boxes int64 [B, 4])``.
    """
    out = np.empty_like(images)
    boxes = np.zeros((len(images), 4), dtype=np.int64)
    n, h, w, _ = images.shape
    for i in range(n):
        y0, y1, x0, x1 = boxes[i] = _loop_box(cams[i], (h, w), threshold)
        img = Image.fromarray(images[i])
        small = img.resize((max(w // s, 1), max(h // s, 1)), Image.NEAREST)
        blurred = small.resize((w, h), Image.NEAREST)
        if y1 > y0:
            blurred.paste(img.crop((x0, y0, x1, y1)), (x0, y0))
        out[i] = np.asarray(blurred)
    return out, boxes


def reference_on_plugin_grid(images: np.ndarray, boxes: np.ndarray, s: int) -> np.ndarray:
    """Per image, the plugin's definition spelled out: cells ``x[::s, ::s]`` repeated, box pasted."""
    out = np.empty_like(images)
    _, h, w, _ = images.shape
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        img = images[i]
        out[i] = np.repeat(np.repeat(img[::s, ::s], s, axis=0), s, axis=1)[:h, :w]
        out[i, y0:y1, x0:x1] = img[y0:y1, x0:x1]
    return out


def batched_compress(images: torch.Tensor, cams: torch.Tensor, threshold: float, s: int):
    norm, degenerate = normalize_cams(cams)
    boxes, fallback = cam_to_boxes(norm, tuple(images.shape[-2:]), threshold, s, degenerate)
    return blend_compress(images, boxes, s), boxes, fallback


def timeit(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls after a warm-up; on CUDA the queue is drained around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large memory copy (read + write counted) on ``device``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), 5, device)
    return 2 * nbytes / t


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{model} ({os.cpu_count()} cores{load})"


def make_cams(batch: int, kind: str, g: torch.Generator, side: int = 7) -> torch.Tensor:
    """Synthetic ``[batch, side, side]`` CAMs: one Gaussian bump per image ("blob") or smoothed noise."""
    if kind == "smooth":
        return F.avg_pool2d(torch.rand(batch, 1, 4 * side, 4 * side, generator=g), 4).squeeze(1)
    centre = torch.rand(batch, 2, generator=g) * (side - 1)
    width = 0.8 + 0.6 * torch.rand(batch, 1, 1, generator=g)
    ax = torch.arange(side, dtype=torch.float32)
    dy = (ax[None, :, None] - centre[:, 0, None, None]) ** 2
    dx = (ax[None, None, :] - centre[:, 1, None, None]) ** 2
    return torch.exp(-(dy + dx) / (2 * width**2)) + 0.1 * torch.rand(batch, side, side, generator=g)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the batched path runs there)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cams", choices=("blob", "smooth"), default="blob",
                   help="blob: one object per image (a Gaussian bump at a random place plus noise, boxes "
                        "of ~15-30%% of the image, as for small objects); smooth: smoothed noise (mostly full boxes)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = round(args.ratio ** 0.5)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    cams = make_cams(args.batch, args.cams, g)
    np_images = images.permute(0, 2, 3, 1).contiguous().numpy()

    ref, ref_boxes = reference_compress(np_images, cams, args.threshold, s)
    dev_images, dev_cams = images.to(device), cams.to(device)
    got, boxes, fallback = batched_compress(dev_images, dev_cams, args.threshold, s)
    got = got.permute(0, 2, 3, 1).cpu().numpy()
    boxes, fallback = boxes.cpu(), fallback.cpu()
    size = (args.size, args.size)
    same_box = torch.equal(align_boxes(torch.from_numpy(ref_boxes)[~fallback], size, s), boxes[~fallback])
    agree = (ref == got).all(axis=(1, 2, 3))
    grid_agree = float((reference_on_plugin_grid(np_images, boxes.numpy(), s) == got).all(axis=(1, 2, 3)).mean())
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double() / (args.size**2)
    full = area == 1.0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference is a serial per-image loop: keep its small torch calls off OpenMP
    try:
        t_ref = timeit(lambda: reference_compress(np_images, cams, args.threshold, s), args.repeats, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    t_bat = timeit(lambda: batched_compress(dev_images, dev_cams, args.threshold, s), args.repeats, device)
    moved = 2 * images.numel() * images.element_size()  # read every pixel once, write every pixel once
    bw = copy_bandwidth(device)
    print(f"compression of {args.batch} images at {args.size} px, ratio {args.ratio:g}, threshold {args.threshold:g}, "
          f"device {device} = {device_name(device)}, {torch.get_num_threads()} torch CPU threads")
    print(f"  boxes: {100 * full.double().mean():.0f}% full image ({int(fallback.sum())} CAM fallbacks), "
          f"mean box area {100 * area.mean():.0f}% of the image")
    print(f"  per-image reference (PIL + loop):  {args.batch / t_ref:10.1f} images/s (1 thread)")
    print(f"  batched torch path:                {args.batch / t_bat:10.1f} images/s")
    print(f"  speed-up:                          {t_ref / t_bat:10.2f}x")
    print(f"  batched path moves at least {moved / t_bat / 1e9:.2f} GB/s = {100 * moved / t_bat / bw:.1f}% of a "
          f"measured memory copy ({bw / 1e9:.2f} GB/s)")
    print(f"  CAM boxes identical (reference box grown to the s-grid): {'yes' if same_box else 'NO'}")
    print(f"  output images identical to the official-semantics reference: {100 * agree.mean():.0f}% "
          f"(full-box images: {100 * agree[full.numpy()].mean() if full.any() else float('nan'):.0f}%, "
          f"others: {100 * agree[~full.numpy()].mean() if (~full).any() else float('nan'):.0f}% -- PIL samples "
          f"cell centres, the plugin stores x[::s, ::s] and grid-aligned boxes)")
    print(f"  output images identical to the per-image loop on the plugin's grid: {100 * grid_agree:.0f}%")


if __name__ == "__main__":
    main()
