"""Benchmark (f): choosing the codec quality (``cim_codec_quality``) from a trained first phase.

MRDC's trade-off is quantity against quality: a lower quality stores more exemplars per byte but
blurs what the model recognises. This script measures both from the first phase alone (no test
image is used), for whole images (MRDC) and for CIM's boxes (the model's CAM at ``--tau``) with
JPEG-coded pixels, and prints what two first-phase criteria would pick:

- the budget probe (``cim_plugin.core.quality_choice.probe_top1``; measured blind to quantity on the
  synthetic set, so not the documented rule, which is the pilot of ``quality_pilot.py``): each class's
  training images are the candidates and the held-out images are fresh draws of the same classes
  from the synthetic generator (``--held-out fresh``, the default: images neither the first phase
  nor the test set contains), or the training images are split into candidates (even positions)
  and held-out images (odd; ``--held-out split``, for data without a generator); for each
  quality the candidates are coded, ranked by budget-consuming herding on the model's features of
  the decoded images and cut where the class's budget (``--units``, default the budget a class of
  the first phase gets when its memory is built: ``memory_size`` // ``init_cls``, less its share of
  the codec's shared tables, scaled by the candidates' share of the class so that the memory keeps
  the share of the candidates it would keep of the whole class) is spent; a linear probe fitted on
  that memory is scored on the clean held-out images, and ``choose_quality`` picks the highest
  quality within ``--tolerance`` (default 1) points of the best probe top-1.
- the fidelity criterion (the earlier rule): the lowest quality whose decoded images
  lose at most ``--fidelity-tolerance`` (default 2) points of the model's top-1 against the same
  memory without the codec. It ignores the budget, so at any budget it picks the blurriest quality
  the model still reads.

Run: ``python benchmarks/choose_quality.py --checkpoint runs/icarl_off_s1993/first_phase.pt``.
"""

from __future__ import annotations

import argparse

import first_phase_model
import numpy as np
import torch
import torch.nn.functional as F

from cim_plugin.core.boxes import cam_to_boxes
from cim_plugin.core.cam import class_activation_maps, normalize_cams
from cim_plugin.core.codec import downsample_factor
from cim_plugin.core.herding import herding_rank
from cim_plugin.core.memory import make_memory
from cim_plugin.core.quality_choice import choose_quality, probe_top1


def budget_memory(net, images, labels, boxes, memory, units: float, clean: torch.Tensor):
    """What a memory of ``units`` per class keeps of the candidates (herding on the decoded images'
    features, budget-consuming as the plugin's memory): the kept indices, the decoded images, their
    costs and their normalised features. ``clean``: the candidates' normalised clean features."""
    decoded = memory.reconstruct(images, boxes)
    costs = memory.costs_of(boxes, images)
    feats = F.normalize(first_phase_model.features(net, decoded).double(), dim=1)
    keep = []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten().numpy()
        keep.append(idx[herding_rank(feats[idx], clean[idx].mean(0), costs[idx], units)])
    return np.concatenate(keep), decoded, costs, feats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--qualities", type=int, nargs="+", default=[10, 20, 30, 50, 75, 90])
    p.add_argument("--ratio", type=float, help="compress_ratio (default: the run's)")
    p.add_argument("--tau", type=float, help="mask_threshold (default: the run's)")
    p.add_argument("--units", type=float, help="budget per class in full exemplars (default: the run's "
                   "memory_size // init_cls, or memory_per_class with fixed_memory)")
    p.add_argument("--tolerance", type=float, default=1.0, help="budget rule: points below the best probe top-1")
    p.add_argument("--held-out", choices=["fresh", "split"], default="fresh",
                   help="fresh: new draws of the same classes (--held-out-per-class of them); split: odd training images")
    p.add_argument("--held-out-per-class", type=int, default=60)
    p.add_argument("--fidelity-tolerance", type=float, default=2.0, help="fidelity rule: points lost against raw")
    args = p.parse_args(argv)
    fp = first_phase_model.load(args.checkpoint, args.pycil, "train")
    net, images, labels, run = fp.net, fp.images, fp.labels, fp.run or {}
    ratio = args.ratio if args.ratio is not None else float(run.get("compress_ratio", 4.0))
    tau = args.tau if args.tau is not None else float(run.get("mask_threshold", 0.5))
    num_classes = int(labels.max()) + 1
    if args.units is not None:
        units = args.units
    elif run.get("fixed_memory"):
        units = float(run["memory_per_class"])
    else:
        units = float(int(run.get("memory_size", 2000)) // num_classes)
    size = images.shape[1]
    with torch.no_grad():
        last = first_phase_model.backbone(net)(first_phase_model.normalise(images))["fmaps"][-1]
        cams, degenerate = normalize_cams(class_activation_maps(last, net.fc.weight, labels))
    cim_boxes = cam_to_boxes(cams, (size, size), tau, downsample_factor(ratio), degenerate)[0].numpy()
    full = np.tile(np.array([[0, size, 0, size]]), (len(images), 1))
    if args.held_out == "split":
        rank_in_class = torch.empty_like(labels)
        for c in labels.unique():
            idx = torch.nonzero(labels == c).flatten()
            rank_in_class[idx] = torch.arange(len(idx))
        cand = (rank_in_class % 2 == 0).numpy()
        held_feats, held_labels = first_phase_model.features(net, images[~cand]), labels[~cand]
    else:
        fresh = first_phase_model.load(args.checkpoint, args.pycil, "test", data_seed=1)
        per = torch.cat([torch.nonzero(fresh.labels == c).flatten()[:args.held_out_per_class] for c in labels.unique()])
        cand = np.ones(len(images), dtype=bool)
        held_feats, held_labels = first_phase_model.features(net, fresh.images[per.numpy()]), fresh.labels[per]
    clean = F.normalize(first_phase_model.features(net, images[cand]).double(), dim=1)  # once, for every quality
    share = float(cand.mean())  # the memory would choose among all of a class's images: same share of the candidates
    print(f"{len(images)} training images of the first phase's {num_classes} classes, {size} px; "
          f"top-1 of the first-phase model: clean {first_phase_model.top1(net, images, labels):.1f}")
    print(f"budget rule: {int(cand.sum())} candidates / {len(held_labels)} held-out images ({args.held_out}), {units:g} units per class "
          f"(x {share:g} for the candidates' share) "
          f"(one unit = {size * size * 3:,} bytes), ratio {ratio:g}, tau {tau:g}")
    for name, boxes in (("mrdc (whole image)", full), (f"cim (CAM boxes, tau {tau:g})", cim_boxes)):
        print(f"\n{name}:")
        print("| codec | bytes / exemplar | exemplars / class kept (of the candidates) | probe top-1 on held-out "
              "| model top-1 on the decoded images (fidelity rule) |")
        print("|---|---|---|---|---|")
        scores, fidelity = {}, {}
        base = None
        for q in [None] + sorted(args.qualities):
            memory = make_memory(images.shape[1:], ratio, "raw" if q is None else "jpeg", 50 if q is None else q)
            shared = memory.metadata_bytes() / (size * size * 3 * num_classes)
            keep, decoded, costs, feats = budget_memory(net, images[cand], labels[cand], boxes[cand], memory,
                                                        (units - shared) * share, clean)
            probe = probe_top1(feats[keep], labels[cand][keep], held_feats, held_labels) if len(keep) else 0.0
            # the fidelity read: every training image decoded (the candidates' decoding when they are all of them)
            read = first_phase_model.top1(net, decoded if cand.all() else memory.reconstruct(images, boxes), labels)
            if q is None:
                base = read
            else:
                scores[q], fidelity[q] = probe, read
            per_class = len(keep) / num_classes
            print(f"| {'raw' if q is None else f'jpeg q{q}'} | {float(costs[keep].mean() if len(keep) else costs.mean()) * size * size * 3:,.0f} "
                  f"| {per_class:.1f} (of {int(cand.sum()) // num_classes}) | {probe:.1f} | {read:.1f} |")
        chosen = choose_quality(scores, args.tolerance)
        low = [q for q in sorted(fidelity) if base - fidelity[q] <= args.fidelity_tolerance]
        print(f"  budget probe would pick (highest quality within {args.tolerance:g} points of the best probe top-1, "
              f"{max(scores.values()):.1f}): cim_codec_quality {chosen}")
        print(f"  fidelity criterion would pick (lowest quality within {args.fidelity_tolerance:g} points of raw, which ignores the "
              "budget): " + (f"cim_codec_quality {low[0]}" if low else "none of these qualities"))


if __name__ == "__main__":
    main()
