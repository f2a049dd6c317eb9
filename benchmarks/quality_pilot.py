"""Benchmark (f2): choosing the codec quality by a pilot — the second phase trained at each quality.

Benchmark (f) (``choose_quality.py``) reads the trade-off off the first phase alone; on the
synthetic set it cannot see what quantity buys (README, *Choosing the quality*): a first-phase
model tells its classes apart from 2 exemplars as well as from 150, and what many exemplars buy is
less forgetting while the network learns the next classes, which only training shows. The pilot
measures that directly on one seed: the same first phase, the second phase once per quality (the
ablation runner's ``cim_first_phase_from`` + ``cim_checkpoint``), and each final network scored
on a **validation set** of fresh draws of all its classes from the synthetic generator (another
generator seed: images neither the training nor the test set contains; the test set is never
used to choose). The rule is the one of ``cim_plugin.core.quality_choice.choose_quality``: the
highest quality within ``--tolerance`` points of the best validation top-1.

Run: ``python benchmarks/quality_pilot.py --checkpoints 10=<run>/task_1.pt 50=<run>/task_1.pt ...``
(PyCIL writes ``task_<n>.pt`` in ``logs/.../<prefix>_<seed>_<convnet>_ckpt/`` with ``cim_checkpoint``).
"""

from __future__ import annotations

import argparse

import first_phase_model
import torch

from cim_plugin.core.quality_choice import choose_quality


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="QUALITY=PATH",
                   help="the last phase's checkpoint of the run at each quality (a name instead of a "
                   "quality, e.g. off=PATH, adds a reference row the rule does not consider)")
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--old-classes", type=int, default=None, help="classes of the first phase (default: init_cls)")
    p.add_argument("--data-seed", type=int, default=1, help="generator seed of the validation draws (0 is the run's own set)")
    p.add_argument("--tolerance", type=float, default=1.0)
    args = p.parse_args(argv)
    runs = {}
    for item in args.checkpoints:
        quality, sep, path = item.partition("=")
        if not sep or not quality:
            raise SystemExit(f"--checkpoints wants QUALITY=PATH, got {item!r}")
        runs[int(quality) if quality.isdigit() else quality] = path  # a name (e.g. off): a reference row
    scores = {}
    print("| quality | validation top-1 | old classes | new classes | images |")
    print("|---|---|---|---|---|")
    for quality, path in sorted(runs.items(), key=lambda kv: (isinstance(kv[0], int), str(kv[0]).zfill(3))):
        val = first_phase_model.load(path, args.pycil, "test", data_seed=args.data_seed)
        old_count = args.old_classes or int((val.run or {}).get("init_cls", 0))
        right = first_phase_model.predictions(val.net, val.images) == val.labels
        old = val.labels < old_count
        top1 = 100.0 * float(right.float().mean())
        if isinstance(quality, int):
            scores[quality] = top1
        print(f"| {quality} | {top1:.1f} | {100.0 * float(right[old].float().mean()):.1f} "
              f"| {100.0 * float(right[~old].float().mean()):.1f} | {len(right)} |")
    best = max(scores.values())
    print(f"rule (highest quality within {args.tolerance:g} points of the best, {best:.1f}): "
          f"cim_codec_quality {choose_quality(scores, args.tolerance)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
