"""Benchmark (c): accuracy at equal bytes on the synthetic set, off vs cam vs pau, 3 seeds.

Runs the ablation runner (``cim-plugin ablate``) on ``benchmarks/configs/{icarl,der,foster,lucir}.json``
(synthetic small-object set: 9 classes at 48 px, 30 train / 20 test images per class, B5 + 4,
resnet18, memory_size 54, compress_ratio 4) with variants off, cam and pau (+ bilevel) and seeds
1993-1995, then prints, per learner, average incremental CNN accuracy (mean ± std over seeds) and
whether cam and pau each beat off. Resumable: run it again to finish an interrupted benchmark.
Run: ``python benchmarks/accuracy_at_equal_bytes.py [--out bench_accuracy] [--seeds ...]``
(about 1.5 h on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cim_plugin import ablation

CONFIGS = Path(__file__).resolve().parent / "configs"
LEARNERS = ("icarl", "der", "foster", "lucir")


def verdicts(rows: list[dict], metric: str = "avg_incremental_cnn_top1") -> list[str]:
    """One line per learner: each plugin variant's mean against off's, and the margin."""
    by = {(r["learner"], r["variant"]): r for r in rows}
    lines = []
    for learner in dict.fromkeys(r["learner"] for r in rows):
        off = by.get((learner, "off"))
        if off is None or off[f"{metric}_mean"] is None:
            continue
        parts = [f"off {off[f'{metric}_mean']:.2f} ± {off[f'{metric}_std']:.2f}"]
        for variant in ("uniform", "random", "cam", "pau"):
            row = by.get((learner, variant))
            if row is None or row[f"{metric}_mean"] is None:
                continue
            margin = row[f"{metric}_mean"] - off[f"{metric}_mean"]
            parts.append(f"{variant} {row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f} "
                         f"({'beats' if margin > 0 else 'does not beat'} off by {margin:+.2f})")
        lines.append(f"{learner:7s} " + "; ".join(parts))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_accuracy")
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=LEARNERS)
    p.add_argument("--variants", nargs="+", default=["off", "cam", "pau"], choices=ablation.VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995])
    args = p.parse_args(argv)
    configs = [CONFIGS / f"{name}.json" for name in args.learners]
    ablation.run_ablation(configs, args.variants, args.seeds, args.out)
    rows = ablation.aggregate(ablation.collect(Path(args.out)))
    print("\naverage incremental CNN top-1 over seeds (equal memory bytes):")
    for line in verdicts(rows):
        print("  " + line)
    print("\naverage incremental NME top-1 over seeds:")
    for line in verdicts(rows, "avg_incremental_nme_top1"):
        print("  " + line)


if __name__ == "__main__":
    main()
