"""Benchmark (e): attention-weighted per-image PCA of feature maps (core/feature_pca.py) on the
synthetic set, with a trained first-phase network.

Loads the network of a phase-0 checkpoint (``first_phase.pt`` of an ablation's off run, or any
``task_0.pt``; PyCIL's modules are imported from ``--pycil`` / ``PYCIL_ROOT``), takes the map that
enters the last ResNet stage (``fmaps[-2]``) of the demo's test images, weights each position by
the image's CAM for its true class (pooled to the map's size), and prints for each k: the mean
cosine similarity of decoded against original maps (each map as one vector, and per position vector), the stored bytes per image
(measured and analytic), the cosine also weighted by the CAM (where the code spends its
directions), the same for the unweighted PCA, the share of each map's variance around its own mean that the code
keeps (cosine alone flatters: ReLU maps share a large positive mean), and the multiple of exemplars per byte against a raw uint8 image.

Run: ``python benchmarks/feature_pca_fidelity.py --checkpoint runs/icarl_off_s1993/first_phase.pt``.
"""

from __future__ import annotations

import argparse

import first_phase_model
import torch
import torch.nn.functional as F

from cim_plugin.core.cam import class_activation_maps, normalize_cams
from cim_plugin.core.feature_pca import code_bytes, decode, encode, position_cosine


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 8])
    p.add_argument("--images", type=int, default=100)
    args = p.parse_args(argv)
    fp = first_phase_model.load(args.checkpoint, args.pycil, "test", args.size, args.images)
    net, x, y = fp.net, first_phase_model.normalise(fp.images), fp.labels
    with torch.no_grad():
        out = net.convnet(x)
        stage_in, last = out["fmaps"][-2], out["fmaps"][-1]
        cam = normalize_cams(class_activation_maps(last, net.fc.weight, y))[0]
        weights = F.interpolate(cam.unsqueeze(1), size=stage_in.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    b, c, h, w = stage_in.shape
    print(f"{b} test images of {int(y.max()) + 1} first-phase classes at {args.size} px; map entering the last stage: "
          f"{c} x {h} x {w} ({c * h * w * 4:,} B as float32; a uint8 image is {args.size * args.size * 3:,} B)")
    for k in args.ks:
        code = encode(stage_in, weights, k)
        back = decode(code)
        cos = position_cosine(stage_in, back)
        per_pos = F.cosine_similarity(stage_in.flatten(2), back.flatten(2), dim=1)  # [B, N]
        wflat = weights.flatten(1)
        wcos = (per_pos * wflat).sum(1) / wflat.sum(1).clamp(min=1e-12)
        uni_back = decode(encode(stage_in, None, k))
        uni_wcos = (F.cosine_similarity(stage_in.flatten(2), uni_back.flatten(2), dim=1) * wflat).sum(1) / wflat.sum(1).clamp(min=1e-12)
        flat, flat_back = stage_in.flatten(2), back.flatten(2)
        centred = flat - flat.mean(dim=2, keepdim=True)
        kept = 1 - (flat - flat_back).pow(2).sum((1, 2)) / centred.pow(2).sum((1, 2)).clamp(min=1e-12)
        uniform = position_cosine(stage_in, uni_back)
        whole = F.cosine_similarity(stage_in.flatten(1), back.flatten(1), dim=1)  # the map as one vector
        measured = code.mean[0].numel() + code.basis[0].numel() + code.coeffs[0].numel() + code.ranges[0].numel() * 2
        print(f"  k={k}: cosine {whole.mean():.3f} of the whole map (min {whole.min():.3f}), "
              f"{cos.mean():.3f} per position, {wcos.mean():.3f} per position CAM-weighted "
              f"(unweighted PCA: {uniform.mean():.3f}, {uni_wcos.mean():.3f}), "
              f"variance around the image's mean kept {kept.mean():.3f}, "
              f"{measured:,} B per image (analytic {code_bytes(c, h * w, k):,}), "
              f"{args.size * args.size * 3 / measured:.1f}x exemplars per byte of a raw image")


if __name__ == "__main__":
    main()
