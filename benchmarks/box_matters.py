"""Benchmark (h): does the box matter at this ``compress_ratio``? No training.

CIM keeps a box at full resolution and downsamples the rest by ``sqrt(compress_ratio)`` per side.
If the object is still recognisable in the downsampled background, *where* the box lies hardly
matters, and a memory of random boxes keeps as much as one of CAM boxes: only the exemplar count
differs. This script measures it with a trained first phase: its model's top-1 on the first
phase's *test* images (a diagnostic: nothing is chosen from it) stored as each memory would give
them back, for

- ``clean``: the original images;
- ``true box``: the object's true box (grid-aligned) kept, the rest downsampled (the ``oracle`` mask);
- ``cam box``: the model's own CAM at ``--tau`` (the ``cam`` mask; the PAU branch starts as this);
- ``random box``: a box of the CAM box's size at a random position (the ``random`` mask's kind);
- ``no box``: the whole image downsampled (``uniform``),

with each memory's capacity (exemplars per byte, as a multiple of a full image), for several ratios.
The box matters at a ratio where ``no box`` and ``random box`` lose clearly against ``true box``.

Run: ``python benchmarks/box_matters.py --checkpoint runs/icarl_off_s1993/first_phase.pt
[--ratios 4 16 64] [--tau 0.5]``.
"""

from __future__ import annotations

import argparse

import first_phase_model
import numpy as np
import torch

from cim_plugin.core.boxes import align_boxes, cam_to_boxes
from cim_plugin.core.cam import class_activation_maps, normalize_cams
from cim_plugin.core.codec import downsample_factor
from cim_plugin.core.memory import make_memory


def moved(boxes: np.ndarray, size: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """Each box at a random grid-aligned position of the image, its size kept."""
    h, w = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    y0 = rng.integers(0, (size - h) // s + 1) * s
    x0 = rng.integers(0, (size - w) // s + 1) * s
    return np.stack([y0, y0 + h, x0, x0 + w], axis=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--ratios", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="seed of the random boxes' positions")
    args = p.parse_args(argv)
    fp = first_phase_model.load(args.checkpoint, args.pycil, "test")
    net, images, labels = fp.net, fp.images, fp.labels
    size, n = images.shape[1], len(images)
    with torch.no_grad():
        last = net.convnet(first_phase_model.normalise(images))["fmaps"][-1]
        cams, degenerate = normalize_cams(class_activation_maps(last, net.fc.weight, labels))
    print(f"{n} test images of the first phase's {int(labels.max()) + 1} classes, {size} px; top-1 of the "
          f"first-phase model, clean: {first_phase_model.top1(net, images, labels):.1f}")
    print("| ratio | memory | top-1 | capacity (× full) | mean box area |\n|---|---|---|---|---|")
    for ratio in args.ratios:
        s = downsample_factor(ratio)
        cam = cam_to_boxes(cams, (size, size), args.tau, s, degenerate)[0].numpy()
        truth = align_boxes(torch.as_tensor(fp.boxes), (size, size), s).numpy()
        memories = {
            "true box": truth,
            "cam box": cam,
            "random box": moved(cam, size, s, np.random.default_rng(args.seed)),
            "no box": np.zeros((n, 4), dtype=np.int64),
        }
        for name, boxes in memories.items():
            mem = make_memory(images.shape[1:], ratio, "raw", 50)
            area = float(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).mean()) / size ** 2
            capacity = 1.0 / float(mem.costs_of(boxes, images).mean())
            print(f"| {ratio:g} | {name} | {first_phase_model.top1(net, mem.reconstruct(images, boxes), labels):.1f} | {capacity:.2f} | {area:.2f} |")


if __name__ == "__main__":
    main()
