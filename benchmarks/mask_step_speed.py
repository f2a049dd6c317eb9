"""Benchmark: wall time of one CIM mask step (bilevel φ update), reference vs fused PAU.

Builds a PyCIL-shaped resnet18 (``convnet`` with the 3×3-stem + max-pool layout PyCIL uses for
non-CIFAR data, one ``nn.ReLU`` per BasicBlock called twice, outputs ``{"fmaps", "features"}``;
``fc`` returning ``{"logits"}``), a :class:`~cim_plugin.core.branch.PAUBranch` on it and the same
branch function as the PyCIL adapter (``_cim_branch_outputs``), then times
:func:`~cim_plugin.core.bilevel.mask_step` on two batches of ``--batch`` images of ``--size`` px,
with BN on batch statistics as in the learner.

The two variants are the PAU implementations of :func:`~cim_plugin.core.pau.use_fused_pau`:
``reference`` (per-op autograd graph) and ``fused`` (one autograd node per PAU call with a
hand-written backward). They run interleaved in one process (A B, B A, A B, ...) because the CPU
may be shared with other jobs; every timed step starts from the same φ and a fresh Adam, so both
variants do identical work. Reported: median ms/step of each, the ratio of the medians, and the
largest difference of the φ-gradient of the same step between the variants (float32 in the
benchmark setup, and in float64 on the same setup cast to float64, where the variants agree to
~1e-16; in float32 the second-order pass itself amplifies round-off, so the float32 difference is
printed next to the float32-vs-float64 error of the reference path).

Run: ``python benchmarks/mask_step_speed.py [--batch 16] [--size 48] [--reps 7] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cim_plugin.core.bilevel import BilevelSettings, bn_batch_statistics, mask_step, outer_loss, outer_terms
from cim_plugin.core.branch import PAUBranch
from cim_plugin.pycil import nets
from cim_plugin.core.pau import use_fused_pau

VARIANTS = {"reference": False, "fused": True}


class BasicBlock(nn.Module):
    """PyCIL's BasicBlock: one ``self.relu`` (in place), called after bn1 and after the sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """PyCIL's resnet18 for non-CIFAR data with ``init_cls != increment`` (3×3 stem, max-pool)."""

    def __init__(self, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, inplanes = [], width
        for i, planes in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, 1 if i == 0 else 2), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = inplanes

    def forward(self, x):
        x = self.conv1(x)
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return {"fmaps": [x1, x2, x3, x4], "features": torch.flatten(F.adaptive_avg_pool2d(x4, 1), 1)}


class SimpleLinear(nn.Linear):
    def forward(self, x):
        return {"logits": super().forward(x)}


class IncrementalNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.convnet = ResNet18(width)
        self.fc = SimpleLinear(self.convnet.out_dim, num_classes)

    def forward(self, x):
        out = self.convnet(x)
        logits = self.fc(out["features"])
        logits.update(out)
        return logits


def make_setup(batch: int, size: int, classes: int, width: int = 64, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    net = IncrementalNet(classes, width).to(dtype).eval()
    branch = PAUBranch([net.convnet]).to(dtype)
    with torch.no_grad():  # φ off the ReLU fit, as after some training (a generic point)
        for p in branch.parameters():
            p.add_(0.02 * torch.randn(p.shape).to(dtype))  # drawn in float32: same point in float64

    def branch_outputs(x, y):  # the adapter's own function (cim_plugin.pycil.nets.branch_outputs)
        return nets.branch_outputs(net, branch, x, y)

    def cil_loss(outputs, x, y):
        return F.cross_entropy(outputs["logits"], y)

    g = torch.Generator().manual_seed(seed + 1)

    def batch_():
        return ((torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dtype),
                torch.randint(0, classes, (batch,), generator=g))

    inner, outer = batch_(), batch_()
    theta = [n for n, p in net.named_parameters() if p.requires_grad and n.startswith("convnet.")]
    return net, branch, branch_outputs, cil_loss, inner, outer, theta


def phi_gradient(setup, fused: bool, settings: BilevelSettings, inner_lr: float) -> list[torch.Tensor]:
    net, branch, branch_outputs, cil_loss, inner, outer, theta = setup
    phi = branch.trainable_parameters()
    with use_fused_pau(fused), bn_batch_statistics(net):
        total, _ = outer_loss(outer_terms(net, theta, branch_outputs, cil_loss, inner, outer, inner_lr, settings), settings)
        return [g.detach() for g in torch.autograd.grad(total, phi)]


def max_abs_difference(u: list[torch.Tensor], v: list[torch.Tensor]) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(u, v))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="images per batch (inner and outer)")
    p.add_argument("--size", type=int, default=48, help="image side in px")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=7, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    p.add_argument("--factor", type=int, default=4, help="CIM downsampling factor s")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = BilevelSettings(factor=args.factor)
    inner_lr = 0.01

    setup = make_setup(args.batch, args.size, args.classes)
    net, branch, branch_outputs, cil_loss, inner, outer, theta = setup
    phi0 = {k: v.clone() for k, v in branch.state_dict().items()}

    def one_step(fused: bool) -> float:
        branch.load_state_dict(phi0)
        phi = branch.trainable_parameters()
        opt = torch.optim.Adam(phi, lr=1e-3)
        with use_fused_pau(fused), bn_batch_statistics(net):
            start = time.perf_counter()
            parts = mask_step(net, theta, branch_outputs, cil_loss, inner, outer, inner_lr, phi, opt, settings)
            elapsed = time.perf_counter() - start
        assert parts.get("skipped") == 0, parts
        return elapsed

    for fused in VARIANTS.values():  # warm-up (allocator, oneDNN primitive caches)
        one_step(fused)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS.items())
    for rep in range(args.reps):
        for name, fused in order if rep % 2 == 0 else order[::-1]:
            times[name].append(one_step(fused))
    med = {name: statistics.median(v) for name, v in times.items()}

    print(f"mask step, resnet18 (PyCIL layout), 2 x {args.batch} images of {args.size} px, "
          f"{args.threads} thread(s), {args.reps} interleaved steps per variant:")
    for name, v in times.items():
        print(f"  {name:9s} median {1e3 * med[name]:7.0f} ms/step   (all: {', '.join(f'{1e3 * t:.0f}' for t in v)})")
    print(f"  speed-up reference/fused = {med['reference'] / med['fused']:.2f}x (ratio of medians)")

    # Gradient check: the same step's φ-gradient from both variants, in float32 (this setup) and in
    # float64 (the same network, batches and φ cast to float64). The float32 second-order pass
    # amplifies round-off: its distance to the float64 gradient is the noise floor to compare with.
    ref32, new32 = (phi_gradient(setup, f, settings, inner_lr) for f in (False, True))
    setup64 = make_setup(args.batch, args.size, args.classes, dtype=torch.float64)
    ref64, new64 = (phi_gradient(setup64, f, settings, inner_lr) for f in (False, True))
    scale = max(float(g.abs().max()) for g in ref64)
    print(f"  φ-gradient of one step (max |grad| = {scale:.3g}), max |difference|:")
    print(f"    float64: fused vs reference            {max_abs_difference(new64, ref64):.3g}")
    print(f"    float32: fused vs reference            {max_abs_difference(new32, ref32):.3g}")
    print(f"    float32 vs float64, reference (floor)  {max_abs_difference(ref32, ref64):.3g}")
    print(f"    float32 vs float64, fused              {max_abs_difference(new32, ref64):.3g}")


if __name__ == "__main__":
    main()
