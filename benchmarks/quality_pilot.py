"""Benchmark (f2): choosing the codec quality by a pilot — the second phase trained at each quality.

Benchmark (f) (``choose_quality.py``) reads the trade-off off the first phase alone; on the
synthetic set it cannot see what quantity buys (docs/results.md, *Choosing the quality*): a first-phase
model tells its classes apart from 2 exemplars as well as from 150, and what many exemplars buy is
less forgetting while the network learns the next classes, which only training shows. The pilot
measures that directly on one seed: the same first phase, the second phase once per quality (the
ablation runner's ``cim_first_phase_from`` + ``cim_checkpoint``), and each final network scored
on a **validation set** of fresh draws of all its classes from the synthetic generator (another
generator seed: images neither the training nor the test set contains; the test set is never
used to choose). The rule is the one of ``cim_plugin.core.quality_choice.choose_quality``: the
highest quality within ``--tolerance`` points of the best validation top-1.

Run, in two commands (the config must set ``"cim_checkpoint": true``; ``--first-phase-from`` an
earlier ablation's folder, or leave it out and the pilot's ``off`` run trains the first phase)::

    cim-plugin ablate cfg.json --seeds 1993 --variants off mrdc@10 mrdc@30 mrdc@50 mrdc@75 mrdc@90 \
        --first-phase-from cim_ablation --jobs 2 --out pilot
    python benchmarks/quality_pilot.py --ablation pilot --variant mrdc

or name each run's last checkpoint: ``--checkpoints 10=<run>/task_1.pt 50=<run>/task_1.pt ...``
(PyCIL writes ``task_<n>.pt`` in ``logs/.../<prefix>_<seed>_<convnet>_ckpt/`` with ``cim_checkpoint``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import first_phase_model
import torch

from cim_plugin.ablation import pycil_checkpoint
from cim_plugin.core.quality_choice import choose_quality


def ablation_checkpoints(out: Path, variant: str) -> dict:
    """{quality: last checkpoint} of the finished runs of ``variant`` (any ``@q``) in an ablation
    folder, and {"off": ...} for its off run; one learner and seed, else an error."""
    runs = {}
    for path in sorted(Path(out, "runs").glob("*/results.json")):
        results = json.loads(path.read_text())
        run = results.get("ablation") or {}
        name, _, quality = str(run.get("variant", "")).partition("@")
        if results.get("finished") is not True or name not in (variant, "off"):
            continue
        config = json.loads((path.parent / "config.json").read_text())
        key = "off" if name == "off" else int(quality or config.get("cim_codec_quality", 50))
        last = pycil_checkpoint(run["pycil_results_file"], len(results["phases"]) - 1)
        if not last.is_file():
            raise SystemExit(f"{path.parent.name} wrote no checkpoint {last}: set \"cim_checkpoint\": true in the config")
        if key in runs:
            raise SystemExit(f"two runs of {variant} at quality {key} in {out} (learners or seeds mixed?): keep one")
        runs[key] = str(last)
    if not any(isinstance(k, int) for k in runs):
        raise SystemExit(f"no finished run of {variant} in {out}/runs")
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoints", nargs="+", metavar="QUALITY=PATH",
                        help="the last phase's checkpoint of the run at each quality (a name instead of a "
                        "quality, e.g. off=PATH, adds a reference row the rule does not consider)")
    source.add_argument("--ablation", metavar="OUT", help="an ablation folder with the runs <variant>@<quality> "
                        "(and off) of one learner and seed, made with cim_checkpoint")
    p.add_argument("--variant", default="mrdc", help="with --ablation: the memory whose quality is chosen (default mrdc)")
    p.add_argument("--pycil", help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--old-classes", type=int, default=None, help="classes of the first phase (default: init_cls)")
    p.add_argument("--data-seed", type=int, default=1, help="generator seed of the validation draws (0 is the run's own set)")
    p.add_argument("--tolerance", type=float, default=1.0)
    args = p.parse_args(argv)
    runs = ablation_checkpoints(Path(args.ablation), args.variant) if args.ablation else {}
    for item in args.checkpoints or ():
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
    if not scores:
        raise SystemExit("no quality to choose from: name at least one QUALITY=PATH (the rows above are references)")
    best = max(scores.values())
    print(f"rule (highest quality within {args.tolerance:g} points of the best, {best:.1f}): "
          f"cim_codec_quality {choose_quality(scores, args.tolerance)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
