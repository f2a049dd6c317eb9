"""Benchmark (g): the noise floor of the later phases at a fixed first phase.

Every variant starts from the same trained first phase (``cim_first_phase_from``) and differs from
the others only by its memory; ``cim_later_seed`` reseeds the generators before the second phase.
Runs of one variant with different later seeds therefore differ by the later phases' chance alone
(batch order, augmentation draws, initialisation of the new classifier rows), and the spread of
their accuracy is the smallest difference between variants that one run per variant can show.

For each variant × later seed the script runs PyCIL once (resumable: finished runs are kept, as in
the ablation runner) and prints, per variant, the later phases' CNN top-1 (mean ± std over later
seeds, with old- and new-class accuracy) and the difference to ``off`` paired by later seed.

Run: ``python benchmarks/noise_floor.py --first-phase <out>/runs/icarl_off_s1993/first_phase.pt
[--config exps/icarl_cim_demo.json] [--seed 1993] [--variants off pau] [--later-seeds 1 2 3] [--out bench_noise]``.
The first-phase file is the one ``cim-plugin ablate`` (or the demo) leaves in its off run's folder;
it must come from the same config (the run refuses a checkpoint of another setting).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from cim_plugin import ablation
from cim_plugin.launch import patched_pycil_root
from cim_plugin.metrics import mean_std

EXPS = Path(__file__).resolve().parent.parent / "exps"
FIGURES = (("later_phases_avg_cnn_top1", "later CNN"), ("later_phases_old_cnn_top1", "old"),
           ("later_phases_new_cnn_top1", "new"), ("later_phases_avg_nme_top1", "later NME"))


@dataclass(frozen=True)
class LaterRun(ablation.RunSpec):
    later: int = 0

    @property
    def name(self) -> str:
        return f"{self.learner}_{self.variant}_s{self.seed}_l{self.later}"


def first_phase_seed(base: dict, first_phase: Path) -> int:
    """The seed ``first_phase`` was trained with: its off run's ``config.json`` beside it (what the
    ablation writes), else the config's first seed."""
    try:
        seed = json.loads((first_phase.parent / "config.json").read_text())["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        seed = base.get("seed", 1993)
    return int(seed[0] if isinstance(seed, list) else seed)


def plan(base: dict, variants, later_seeds, first_phase: Path, seed: int | None = None) -> list[LaterRun]:
    """One run per variant and later seed, all from ``first_phase``; ``seed``: the seed that first
    phase was trained with (default ``first_phase_seed``)."""
    seed = first_phase_seed(base, first_phase) if seed is None else seed
    runs = []
    for variant in variants:
        for later in later_seeds:
            config = ablation.variant_config(base, variant, seed)
            config.update({"cim_first_phase_from": str(first_phase), "cim_later_seed": int(later),
                           "prefix": f"noise_{variant}_l{later}"})
            runs.append(LaterRun(str(base["model_name"]).lower(), variant, seed, config, int(later)))
    return runs


def summary_of(run_dir: Path) -> dict | None:
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results.get("summary") if results.get("finished") else None


def table(runs: list[LaterRun], out: Path) -> str:
    got = {(r.variant, r.later): summary_of(out / "runs" / r.name) for r in runs}
    variants = list(dict.fromkeys(r.variant for r in runs))
    lines = ["| variant | later seeds | " + " | ".join(t for _, t in FIGURES) + " | Δ later CNN vs off (paired) |",
             "|---|---|" + "---|" * (len(FIGURES) + 1)]
    for v in variants:
        rows = {k[1]: s for k, s in got.items() if k[0] == v and s}
        cells = []
        for key, _ in FIGURES:
            mean, std, n = mean_std([s.get(key) for s in rows.values()])
            cells.append("–" if mean is None else f"{mean:.1f} ± {std or 0:.1f}")
        diffs = [s["later_phases_avg_cnn_top1"] - got[("off", k)]["later_phases_avg_cnn_top1"]
                 for k, s in rows.items() if v != "off" and got.get(("off", k))]
        mean, std, n = mean_std(diffs) if diffs else (None, None, 0)
        delta = "–" if mean is None else f"{mean:+.1f} ± {std or 0:.1f} (n={n})"
        lines.append(f"| {v} | {' '.join(str(k) for k in sorted(rows))} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(EXPS / "icarl_cim_demo.json"))
    p.add_argument("--first-phase", required=True, type=Path, help="a first_phase.pt of an off run of this config")
    p.add_argument("--variants", nargs="+", default=["off", "pau"])
    p.add_argument("--later-seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--seed", type=int, default=None,
                   help="the seed the first phase was trained with (default: its off run's config.json beside it, "
                        "else the config's first seed)")
    p.add_argument("--out", type=Path, default=Path("bench_noise"))
    args = p.parse_args(argv)
    if not args.first_phase.is_file():
        raise SystemExit(f"--first-phase: no file {args.first_phase}")
    root = patched_pycil_root(None)
    base = ablation.load_config(args.config, root)
    runs = plan(base, args.variants, args.later_seeds, args.first_phase.resolve(), args.seed)
    ablation.check_plan(runs)
    outcome = ablation.execute(runs, args.out, root)
    text = table(runs, args.out)
    (args.out / "noise_floor.md").write_text(text + "\n")
    print(text)
    if outcome["failed"]:
        raise SystemExit(f"failed: {', '.join(outcome['failed'])}")


if __name__ == "__main__":
    main()
