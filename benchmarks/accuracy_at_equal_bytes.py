"""Benchmark (c): accuracy at equal bytes on the synthetic set, 3 seeds, with a shared first phase.

Runs the ablation runner (``cim-plugin ablate``) on the demo configs ``exps/{icarl,foster}_cim_demo.json``
(synthetic small-object set: 10 classes at 128 px, 60 train images per class, B5 + 5, resnet18
with the ImageNet stem, memory_size 50, compress_ratio 4, mask_threshold 0.5; the iCaRL demo tests
on 60 images per class and trains at lr 0.01, 15 + 12 epochs, see docs/results.md, *The earlier setting*) with
variants off, random, cam, pau and oracle and seeds 1993-1995; the off run of each seed trains the
first phase and every variant starts from it. Prints, per learner, average incremental CNN
accuracy and the later phases' CNN accuracy (mean ± std over seeds), each variant's margin over
off and whether it exceeds one standard deviation (the larger of the two rows' stds). Resumable:
run it again to finish an interrupted benchmark. ``--configs`` takes other JSON files.
Run: ``python benchmarks/accuracy_at_equal_bytes.py [--out bench_accuracy] [--seeds ...]``
(about 25 min per learner and seed for the five variants on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cim_plugin import ablation, ablation_report

EXPS = Path(__file__).resolve().parent.parent / "exps"
LEARNERS = ("icarl", "foster", "der", "lucir")


def verdicts(rows: list[dict], metric: str = "avg_incremental_cnn_top1") -> list[str]:
    """One line per learner: each variant's mean against off's, the margin, and whether the margin
    exceeds one standard deviation (the larger of the two rows')."""
    by = {(r["learner"], r["variant"]): r for r in rows}
    lines = []
    for learner in dict.fromkeys(r["learner"] for r in rows):
        off = by.get((learner, "off"))
        if off is None or off[f"{metric}_mean"] is None:
            continue
        parts = [f"off {off[f'{metric}_mean']:.2f} ± {off[f'{metric}_std']:.2f}"]
        names = sorted({r["variant"] for r in rows if r["learner"] == learner} - {"off"}, key=ablation_report.variant_rank)
        for variant in names:
            row = by.get((learner, variant))
            if row is None or row[f"{metric}_mean"] is None:
                continue
            margin = row[f"{metric}_mean"] - off[f"{metric}_mean"]
            std = max(row[f"{metric}_std"] or 0.0, off[f"{metric}_std"] or 0.0)
            verdict = "beats off by > 1 std" if margin > std else ("beats off within 1 std" if margin > 0 else "does not beat off")
            parts.append(f"{variant} {row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f} ({margin:+.2f}: {verdict})")
        lines.append(f"{learner:7s} " + "; ".join(parts))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_accuracy")
    p.add_argument("--learners", nargs="+", default=["icarl", "foster"], choices=LEARNERS)
    p.add_argument("--configs", nargs="+", help="PyCIL JSON files instead of exps/<learner>_cim_demo.json")
    p.add_argument("--variants", nargs="+", default=["off", "random", "cam", "pau", "oracle"],
                   help="off, mrdc, a mask source, or a mask source + a pixel codec such as pau+jpeg")
    p.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995])
    args = p.parse_args(argv)
    configs = args.configs or [EXPS / f"{name}_cim_demo.json" for name in args.learners]
    ablation.run_ablation(configs, args.variants, args.seeds, args.out)
    rows = ablation_report.aggregate(ablation_report.collect(Path(args.out)))
    for metric, title in (("avg_incremental_cnn_top1", "average incremental CNN top-1"),
                          ("later_phases_avg_cnn_top1", "CNN top-1 of the phases after the shared first one"),
                          ("avg_incremental_nme_top1", "average incremental NME top-1")):
        print(f"\n{title} over seeds (equal memory bytes):")
        for line in verdicts(rows, metric):
            print("  " + line)


if __name__ == "__main__":
    main()
