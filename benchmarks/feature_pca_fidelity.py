"""Benchmark (e): attention-weighted per-image PCA of feature maps (core/feature_pca.py) on the
synthetic set, with a trained first-phase network.

Loads the network of a phase-0 checkpoint (``first_phase.pt`` of an ablation's off run, or any
``task_0.pt``; PyCIL's modules are imported from ``--pycil`` / ``PYCIL_ROOT``), takes the map that
enters the last ResNet stage (``fmaps[-2]``) of the demo's test images, weights each position by
the image's CAM for its true class (pooled to the map's size), and prints for each k: the mean
cosine similarity of decoded against original position vectors, the stored bytes per image
(measured and analytic), the share of each map's variance around its own mean that the code
keeps (cosine alone flatters: ReLU maps share a large positive mean), and the multiple of exemplars per byte against a raw uint8 image.

Run: ``python benchmarks/feature_pca_fidelity.py --checkpoint runs/icarl_off_s1993/first_phase.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from cim_plugin.core.cam import class_activation_maps, normalize_cams
from cim_plugin.core.feature_pca import code_bytes, decode, encode, position_cosine
from cim_plugin.data.synthetic import SyntheticSpec, load_synthetic


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pycil", default=os.environ.get("PYCIL_ROOT"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 8])
    p.add_argument("--images", type=int, default=100)
    args = p.parse_args(argv)
    if not args.pycil:
        p.error("give --pycil or set PYCIL_ROOT: the checkpoint holds PyCIL's network classes")
    sys.path.insert(0, args.pycil)
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    net = payload["learner"]["_network"].eval()
    data = load_synthetic(SyntheticSpec(num_classes=10, image_size=args.size, train_per_class=60, test_per_class=20))
    classes = sorted(int(c) for c in payload["class_order"][: net.fc.weight.shape[0]])
    order = {c: i for i, c in enumerate(payload["class_order"])}
    keep = [i for i, y in enumerate(data.test_y) if order[int(y)] < net.fc.weight.shape[0]][: args.images]
    x = torch.from_numpy(data.test_x[keep]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor([order[int(v)] for v in data.test_y[keep]])
    with torch.no_grad():
        out = net.convnet(x)
        stage_in, last = out["fmaps"][-2], out["fmaps"][-1]
        cam = normalize_cams(class_activation_maps(last, net.fc.weight, y))[0]
        weights = F.interpolate(cam.unsqueeze(1), size=stage_in.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    b, c, h, w = stage_in.shape
    print(f"{b} test images of {len(classes)} first-phase classes at {args.size} px; map entering the last stage: "
          f"{c} x {h} x {w} ({c * h * w * 4:,} B as float32; a uint8 image is {args.size * args.size * 3:,} B)")
    for k in args.ks:
        code = encode(stage_in, weights, k)
        back = decode(code)
        cos = position_cosine(stage_in, back)
        flat, flat_back = stage_in.flatten(2), back.flatten(2)
        centred = flat - flat.mean(dim=2, keepdim=True)
        kept = 1 - (flat - flat_back).pow(2).sum((1, 2)) / centred.pow(2).sum((1, 2)).clamp(min=1e-12)
        uniform = position_cosine(stage_in, decode(encode(stage_in, None, k)))
        measured = code.mean[0].numel() + code.basis[0].numel() + code.coeffs[0].numel() + code.ranges[0].numel() * 2
        print(f"  k={k}: cosine {cos.mean():.3f} (min {cos.min():.3f}; unweighted PCA {uniform.mean():.3f}), "
              f"variance around the image's mean kept {kept.mean():.3f}, "
              f"{measured:,} B per image (analytic {code_bytes(c, h * w, k):,}), "
              f"{args.size * args.size * 3 / measured:.1f}x exemplars per byte of a raw image")


if __name__ == "__main__":
    main()
