"""Benchmark (n): is the CAM's 4 × 4 map what keeps the boxes looser than the object? No training.

At 128 px a ResNet-18 with the ImageNet stem ends on a 4 × 4 map: one cell is 1/16 of the image,
and an object of 1/9 of it (the synthetic set's) straddles two cells a side, so a box that keeps
it whole covers about a quarter of the image whatever the CAM's quality. The README explains the
gap between CAM boxes and the true boxes (``oracle``, +2.5 to +9 points) by that resolution. This
script tests the explanation on a trained first phase: the recall / area operating points (boxes
as the memory builds them: bilinear upsampling, threshold τ, tight box, grid-aligned) of maps of
different resolution from the *same* network, for the true class:

- ``cam (4x4)``: the plugin's CAM (classifier row · last map, ``cam`` / ``pau``'s start);
- ``grad-cam layer4 (4x4)``: Grad-CAM on the last map (the same resolution, another weighting);
- ``grad-cam layer3 (8x8)``: Grad-CAM on the map before the last stage (twice as fine);
- ``cam, input x2 (8x8)``: the plugin's CAM of the image upsampled twice (a finer map of the same
  head, on objects twice their training size).

For each: the smallest mean box area at which the mean recall (share of the true object inside the
box) reaches 0.90 and 0.95 over a τ grid, and the τ that gives it. A finer map that reaches the same
recall at a smaller area would store more exemplars per byte with the object kept: the explanation
holds if such a map exists in the network.

Run: ``PYCIL_ROOT=../PyCIL python benchmarks/finer_maps.py <ablation>/runs/icarl_off_s1993/first_phase.pt [...]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import first_phase_model as fpm
import torch
import torch.nn.functional as F

from cim_plugin.core.boxes import box_area_fraction
from cim_plugin.core.cam import normalize_cams
from cim_plugin.core.diagnostics import recall_area_curve
from cim_plugin.core.masks import OracleMaskSource
from cim_plugin.pycil.nets import backbones, cam_and_features, unwrap

#: τ grid the operating points are read from.
TAUS = [round(0.05 * i, 2) for i in range(1, 20)]


def grad_cams(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
              stages: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Grad-CAM ``[B, h, w]`` of the true class's logit on ``fmaps[stage]`` for each of ``stages``,
    from one forward and one backward pass (summed over backbones, DER / FOSTER):
    ReLU(Σ_c mean(∂logit/∂A_c) · A_c)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # maps need a graph even where θ is frozen
        outs = [bb(x) for bb in backbones(net)]
        maps = [[o["fmaps"][stage] for o in outs] for stage in stages]
        logits = unwrap(net).fc(torch.cat([o["features"] for o in outs], dim=1))["logits"]
        score = logits.gather(1, labels[:, None]).sum()
        grads = torch.autograd.grad(score, [a for per_stage in maps for a in per_stage])
    per_stage = len(outs)
    return tuple(
        sum(torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
            for g, a in zip(grads[i * per_stage:(i + 1) * per_stage], stage_maps)).detach()
        for i, stage_maps in enumerate(maps))


def maps_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 50) -> dict[str, torch.Tensor]:
    names = ("cam", "grad-cam layer4", "grad-cam layer3", "cam, input x2")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        for xb, yb in zip(x.split(batch), y.split(batch)):
            maps = (cam_and_features(net, xb, yb)[0], *grad_cams(net, xb, yb, (-1, -2)),
                    cam_and_features(net, F.interpolate(xb, scale_factor=2, mode="bilinear", align_corners=False), yb)[0])
            for name, m in zip(names, maps):
                parts[name].append(m)
    return {name: torch.cat(ms) for name, ms in parts.items()}


def operating_point(curve: list[dict], recall: float) -> dict | None:
    """The curve's row of smallest mean area whose mean recall reaches ``recall`` (None: none does)."""
    rows = [r for r in curve if r["mean_recall"] >= recall]
    return min(rows, key=lambda r: r["mean_box_area"]) if rows else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fpm.add_checkpoint_arguments(p)
    p.add_argument("--recalls", type=float, nargs="+", default=[0.90, 0.95])
    a = p.parse_args(argv)
    for ck in a.checkpoints:
        fp = fpm.load(ck, a.pycil, "train", a.size, a.images)
        net, x, y = fp.net.eval(), fpm.normalise(fp.images), torch.as_tensor(fp.labels)
        truth = torch.as_tensor(fp.boxes)
        oracle = OracleMaskSource(a.factor).boxes(x, y, truth=truth).boxes
        oracle_area = float(box_area_fraction(oracle, (a.size, a.size)).mean())
        print(f"{ck}: {len(x)} training images, {len(y.unique())} classes; true boxes (grid-aligned) "
              f"cover {oracle_area:.3f} of the image")
        for name, cam in maps_of(net, x, y).items():
            norm, _ = normalize_cams(cam.float())
            curve = recall_area_curve(norm, truth, (a.size, a.size), a.factor, TAUS)
            points = []
            for r in a.recalls:
                row = operating_point(curve, r)
                points.append(f"recall ≥ {r:.2f}: " + ("never" if row is None else
                              f"area {row['mean_box_area']:.3f} (τ {row['tau']:.2f}, recall {row['mean_recall']:.3f})"))
            print(f"  {name:16s} {tuple(cam.shape[-2:])!s:8s} " + "; ".join(points))


if __name__ == "__main__":
    main()
