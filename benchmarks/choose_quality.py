"""Benchmark (f): choosing the codec quality (``cim_codec_quality``) from a trained first phase.

MRDC's trade-off is quantity against quality: a lower quality stores more exemplars per byte but
blurs what the model recognises. This script measures both on the first phase's own training images
(what the memory would store; no test image is used to choose): for each quality it prints the
capacity (exemplars the byte budget holds, as a multiple of plugin-off's) and the first-phase
model's top-1 on the decoded images, for whole images (MRDC) and for CIM's boxes (the model's CAM at
``--tau``) with JPEG-coded pixels, next to the same model on the clean images and on raw CIM
exemplars. The rule it applies: **the lowest quality whose decoded images lose at most
``--tolerance`` points (default 2) against the same memory without the codec** — below it the
codec, not the budget, decides what is remembered.

Run: ``python benchmarks/choose_quality.py --checkpoint runs/icarl_off_s1993/first_phase.pt``.
"""

from __future__ import annotations

import argparse

import first_phase_model
import numpy as np
import torch

from cim_plugin.core.boxes import cam_to_boxes
from cim_plugin.core.cam import class_activation_maps, normalize_cams
from cim_plugin.core.codec import downsample_factor
from cim_plugin.core.memory import make_memory


def stored(images: np.ndarray, boxes: np.ndarray, ratio: float, codec: str, quality: int) -> tuple[np.ndarray, float]:
    """What the memory gives back, and the capacity multiple (full bytes / mean bytes per exemplar)."""
    mem = make_memory(images.shape[1:], ratio, codec, quality)
    costs = mem.costs_of(boxes, images)
    return mem.reconstruct(images, boxes), 1.0 / float(costs.mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--qualities", type=int, nargs="+", default=[10, 20, 30, 50, 75, 90])
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=2.0)
    args = p.parse_args(argv)
    fp = first_phase_model.load(args.checkpoint, args.pycil, "train")
    net, images, labels = fp.net, fp.images, fp.labels
    size = images.shape[1]
    with torch.no_grad():
        last = net.convnet(first_phase_model.normalise(images))["fmaps"][-1]
        cams, degenerate = normalize_cams(class_activation_maps(last, net.fc.weight, labels))
    cim_boxes = cam_to_boxes(cams, (size, size), args.tau, downsample_factor(args.ratio), degenerate)[0].numpy()
    full = np.tile(np.array([[0, size, 0, size]]), (len(images), 1))
    print(f"{len(images)} training images of the first phase's {int(labels.max()) + 1} classes, {size} px; "
          f"top-1 of the first-phase model: clean {first_phase_model.top1(net, images, labels):.1f}")
    for name, boxes in (("mrdc (whole image)", full), (f"cim (CAM boxes, tau {args.tau:g})", cim_boxes)):
        raw, raw_cap = stored(images, boxes, args.ratio, "raw", 50)
        base = first_phase_model.top1(net, raw, labels)
        print(f"\n{name}: raw pixels {base:.1f} top-1 at {raw_cap:.2f}x capacity")
        chosen = None
        for q in sorted(args.qualities):
            dec, cap = stored(images, boxes, args.ratio, "jpeg", q)
            acc = first_phase_model.top1(net, dec, labels)
            ok = base - acc <= args.tolerance
            chosen = q if ok and chosen is None else chosen
            print(f"  jpeg q{q:<3d} top-1 {acc:5.1f} ({acc - base:+5.1f}), capacity {cap:7.2f}x{'  <- within tolerance' if ok else ''}")
        print(f"  rule (lowest quality within {args.tolerance:g} points of raw): "
              + (f"cim_codec_quality {chosen}" if chosen is not None else "none of these qualities"))


if __name__ == "__main__":
    main()
