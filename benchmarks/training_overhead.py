"""Benchmark (b): wall-time overhead of CIM in a FOSTER run: pau + bilevel vs cam vs off.

Runs one seed of FOSTER with plugin off, cam and pau (the ablation runner; resumable, so pointing
``--out`` at a benchmark (c) folder reuses its FOSTER runs of the same config and seed), then
prints each run's wall time, the ratios to off, and where the plugin's extra time goes (seconds in
mask steps, box refreshes and memory building, read from results.json), with the number of mask
steps and the seconds per step. Ratios are of runs made one after the other on this machine; every run trains its own first phase
(independent runs), so the wall times are whole runs.
Run: ``python benchmarks/training_overhead.py [--config exps/foster_cim_demo.json] [--seed 1993] [--variants off pau]``.
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
    p.add_argument("--variants", nargs="+", default=["off", "cam", "pau"], choices=["off", "cam", "pau"],
                   help="runs to time (off is always run: the ratios are to it)")
    args = p.parse_args(argv)
    variants = ["off", *[v for v in args.variants if v != "off"]]
    # independent runs: every variant trains its own first phase, so the wall times are whole runs
    # (a shared first phase would leave phase 0's training out of the plugin runs)
    ablation.run_ablation([args.config], variants, [args.seed], args.out, figures=False, shared_first_phase=False)
    learner = ablation.load_config(args.config)["model_name"].lower()
    runs = {}
    for variant in variants:
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
    if "pau" in runs:
        pau = runs["pau"][0]["summary"]["wall_time_s"]
        cam = f"pau / cam = {pau / runs['cam'][0]['summary']['wall_time_s']:.2f}x; " if "cam" in runs else ""
        print(f"  {cam}pau / off = {pau / off_wall:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
