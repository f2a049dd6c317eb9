"""Benchmark (b): wall-time overhead of CIM in a FOSTER run: pau + bilevel vs cam vs off.

Runs one seed of FOSTER with plugin off, cam and pau (the ablation runner; resumable, so pointing
``--out`` at a benchmark (c) folder reuses its FOSTER runs of the same config and seed), then
prints each run's wall time, the ratios to off, and where the plugin's extra time goes (seconds in
mask steps, box refreshes and memory building, read from results.json), with the number of mask
steps and the seconds per step. Ratios are of runs made one after the other on this machine.
Run: ``python benchmarks/training_overhead.py [--config exps/foster_cim_demo.json] [--seed 1993]``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from cim_plugin import ablation

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "foster.json"
STEPS = re.compile(r"CIM mask steps: (\d+) this epoch")


def mask_steps_in_log(log: Path) -> int:
    try:
        return sum(int(m.group(1)) for m in STEPS.finditer(log.read_text(errors="replace")))
    except OSError:
        return 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="a FOSTER PyCIL JSON (default: benchmarks/configs/foster.json)")
    p.add_argument("--seed", type=int, default=1993)
    p.add_argument("--out", default="bench_overhead")
    args = p.parse_args(argv)
    ablation.run_ablation([args.config], ["off", "cam", "pau"], [args.seed], args.out, figures=False)
    learner = ablation.load_config(args.config)["model_name"].lower()
    runs = {}
    for variant in ("off", "cam", "pau"):
        run_dir = Path(args.out) / "runs" / f"{learner}_{variant}_s{args.seed}"
        runs[variant] = (json.loads((run_dir / "results.json").read_text()), run_dir / "pycil.log")
    off_wall = runs["off"][0]["summary"]["wall_time_s"]
    print(f"\n{learner} training-time overhead, seed {args.seed}, config {args.config}:")
    for variant, (res, log) in runs.items():
        s = res["summary"]
        wall = s["wall_time_s"]
        parts = s.get("cim_seconds") or {}
        line = f"  {variant:4s} wall {wall:7.1f} s = {wall / off_wall:.2f}x off"
        if parts:
            line += "; plugin work: " + ", ".join(f"{k} {v:.1f} s ({100 * v / wall:.0f}%)" for k, v in sorted(parts.items()))
        steps = mask_steps_in_log(log)
        if steps:
            line += f"; {steps} mask steps, {parts.get('mask_steps', 0.0) / steps:.2f} s each"
        print(line)
    pau, cam = runs["pau"][0]["summary"]["wall_time_s"], runs["cam"][0]["summary"]["wall_time_s"]
    print(f"  pau / cam = {pau / cam:.2f}x; pau / off = {pau / off_wall:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
