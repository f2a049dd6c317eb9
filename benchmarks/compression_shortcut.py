"""Benchmark (k): does a later-phase network call *clean* old-class images new because it learnt
the old classes from compressed exemplars? No training.

A memory of compressed exemplars trains the CNN head on every old-class image compressed, while
only the artefact augmentation's share of the new-class images is. If the head learns
"compressed ⇒ old class", it scores old-class test images better when they are compressed the way
the memory compresses than when they are clean, and sends clean old-class images to new classes.
This script measures it on a later-phase checkpoint (``cim_checkpoint``) of the synthetic set:
top-1 and the share predicted as an old class, for old- and new-class test images, clean and passed
through the memory's compression (the network's own CAM box at ``--tau``, ``--ratio``, ``--codec``
at ``--quality``; ``--codec raw`` for plain CIM, ``--whole`` for MRDC: the whole image as the box).

Run: ``python benchmarks/compression_shortcut.py --checkpoint <run>/..._task_1.pt --old 5
[--ratio 64] [--codec jpeg] [--quality 50] [--tau 0.5] [--whole]``.
"""

from __future__ import annotations

import argparse

import first_phase_model
import torch

from cim_plugin.core.boxes import box_area_fraction, cam_to_boxes
from cim_plugin.core.cam import normalize_cams
from cim_plugin.core.codec import downsample_factor
from cim_plugin.core.memory import make_memory
from cim_plugin.pycil.nets import cam_and_features


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--old", type=int, required=True, help="number of old classes (the first phases' classes)")
    p.add_argument("--ratio", type=float, default=64.0)
    p.add_argument("--codec", default="jpeg", choices=["raw", "jpeg", "webp", "png"])
    p.add_argument("--quality", type=int, default=50)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--whole", action="store_true", help="the whole image as the box (MRDC: only the codec compresses)")
    args = p.parse_args(argv)
    fp = first_phase_model.load(args.checkpoint, args.pycil, "test")
    net, images, labels = fp.net, fp.images, fp.labels
    size = images.shape[1]
    if args.whole:
        boxes = torch.tensor([[0, size, 0, size]], dtype=torch.int64).repeat(len(images), 1)
    else:
        x = first_phase_model.normalise(images)
        with torch.no_grad():
            cams = torch.cat([cam_and_features(net, xb, yb)[0] for xb, yb in zip(x.split(64), labels.split(64))])
        norm, degenerate = normalize_cams(cams)
        boxes = cam_to_boxes(norm, (size, size), args.tau, downsample_factor(args.ratio), degenerate)[0]
    area = float(box_area_fraction(boxes, (size, size)).mean())
    boxes = boxes.numpy()
    memory = make_memory(images.shape[1:], args.ratio, args.codec, args.quality)
    compressed = memory.reconstruct(images, boxes)
    print(f"{len(images)} test images, {args.old} old classes; memory: ratio {args.ratio:g}, {args.codec}"
          f"{'' if args.codec == 'raw' else f' q{args.quality}'}, "
          f"{'the whole image as the box' if args.whole else f'CAM boxes at τ {args.tau}'} (mean area {area:.2f})")
    print("| test images | as given | top-1 | predicted as an old class |\n|---|---|---|---|")
    for name, part in (("old classes", labels < args.old), ("new classes", labels >= args.old)):
        for view, shown in (("clean", images), ("compressed", compressed)):
            pred = first_phase_model.predictions(net, shown[part.numpy()])
            top1 = 100.0 * float((pred == labels[part]).float().mean())
            old = 100.0 * float((pred < args.old).float().mean())
            print(f"| {name} | {view} | {top1:.1f} | {old:.1f} |")


if __name__ == "__main__":
    main()
