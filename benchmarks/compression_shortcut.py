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
import numpy as np
import torch

from cim_plugin.core.boxes import cam_to_boxes
from cim_plugin.core.cam import class_activation_maps, normalize_cams
from cim_plugin.core.codec import downsample_factor
from cim_plugin.core.memory import make_memory


def predictions(net: torch.nn.Module, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(first_phase_model.normalise(images[s: s + batch]))["logits"].argmax(1)
                          for s in range(0, len(images), batch)])


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
    s = downsample_factor(args.ratio)
    with torch.no_grad():
        last = torch.cat([net.convnet(first_phase_model.normalise(images[i: i + 64]))["fmaps"][-1]
                          for i in range(0, len(images), 64)])
        cams, degenerate = normalize_cams(class_activation_maps(last, net.fc.weight, labels))
    boxes = cam_to_boxes(cams, (size, size), args.tau, s, degenerate)[0].numpy()
    if args.whole:
        boxes = np.tile(np.array([[0, size, 0, size]], dtype=np.int64), (len(images), 1))
    memory = make_memory(images.shape[1:], args.ratio, args.codec, args.quality)
    compressed = memory.reconstruct(images, boxes)
    print(f"{len(images)} test images, {args.old} old classes; memory: ratio {args.ratio:g}, {args.codec}"
          f"{'' if args.codec == 'raw' else f' q{args.quality}'}, CAM boxes at τ {args.tau} "
          f"(mean area {float(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).mean()) / size ** 2:.2f})")
    print("| test images | as given | top-1 | predicted as an old class |\n|---|---|---|---|")
    for name, part in (("old classes", labels < args.old), ("new classes", labels >= args.old)):
        for view, x in (("clean", images), ("compressed", compressed)):
            pred = predictions(net, x[part.numpy()])
            top1 = 100.0 * float((pred == labels[part]).float().mean())
            old = 100.0 * float((pred < args.old).float().mean())
            print(f"| {name} | {view} | {top1:.1f} | {old:.1f} |")


if __name__ == "__main__":
    main()
