"""The built-in demo: plugin off vs on at the same memory budget, on the synthetic set.

For each learner, runs PyCIL's own ``main.py`` (in the patched PyCIL checkout) with
``exps/<learner>_off_demo.json`` and ``exps/<learner>_cim_demo.json``, reads the two results
files and prints a comparison: accuracy per phase, exemplars per class, bytes against the budget,
wall time. Each run's full output goes to ``<out>/<learner>_<variant>.log``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import locate
from .launch import RESULTS_MARK, RunError, patched_pycil_root, run_pycil  # noqa: F401 (RESULTS_MARK: re-exported)

DEMO_LEARNERS = ("icarl", "der", "foster", "lucir")
#: "off" and "cim" are the demo files as they are; a mask source name runs the "cim" file with
#: that ``cim_mask`` (same budget), for ablations.
VARIANTS = ("off", "cim")
MASK_VARIANTS = ("pau", "cam", "uniform", "random")


#: Errors of the demo are those of the runs it launches.
DemoError = RunError


@dataclass
class RunOutcome:
    learner: str
    variant: str
    results: dict
    wall_s: float
    log: Path


def demo_config(learner: str, variant: str, out_dir: Path) -> Path:
    """The config file for one run: the shipped demo file, or one derived from it for a mask ablation."""
    shipped = "cim" if variant in MASK_VARIANTS else variant
    path = locate.plugin_dir("exps") / f"{learner}_{shipped}_demo.json"
    if not path.is_file():
        raise DemoError(f"no demo config {path}")
    if variant == shipped:
        return path
    config = json.loads(path.read_text())
    config.update({"cim_mask": variant, "prefix": f"demo_{variant}"})
    derived = out_dir / f"{learner}_{variant}_demo.json"
    derived.parent.mkdir(parents=True, exist_ok=True)
    derived.write_text(json.dumps(config, indent=4) + "\n")
    return derived


def run_demo(learners=DEMO_LEARNERS, out_dir: Path | None = None, root: Path | None = None, echo=None,
             variants=VARIANTS) -> list[RunOutcome]:
    root = patched_pycil_root(root)
    out_dir = Path(out_dir or Path.cwd() / "cim_demo")
    outcomes = []
    for learner in learners:
        for variant in variants:
            config = demo_config(learner, variant, out_dir)
            log = out_dir / f"{learner}_{variant}.log"
            print(f"[demo] {learner:7s} plugin {variant:3s} ... (log: {log})", flush=True)
            results_file, wall = run_pycil(root, config, log, echo)
            results = json.loads(results_file.read_text())
            outcomes.append(RunOutcome(learner, variant, results, wall, log))
            print(f"[demo] {learner:7s} plugin {variant:3s} done in {wall:.0f} s -> {results_file}", flush=True)
    table = comparison_table(outcomes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(table + "\n")
    print(table)
    print(f"\n[demo] comparison saved to {out_dir / 'comparison.md'}")
    return outcomes


def comparison_table(outcomes: list[RunOutcome]) -> str:
    head = (
        "| learner | plugin | CNN top-1 per phase | NME top-1 per phase | avg inc. CNN | exemplars/class "
        "| box area per phase | bytes used / budget | wall s |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for o in outcomes:
        phases = o.results["phases"]
        mem = phases[-1]["memory"]
        cnn = " / ".join(f"{p['cnn_top1']:.1f}" for p in phases)
        nme = " / ".join("-" if p.get("nme_top1") is None else f"{p['nme_top1']:.1f}" for p in phases)
        avg = o.results["summary"]["avg_incremental_cnn_top1"]
        area = " / ".join("-" if p["memory"].get("mean_box_area") is None else f"{p['memory']['mean_box_area']:.2f}" for p in phases)
        variant = o.variant if o.variant != "cim" else f"cim ({o.results.get('cim_mask')})"
        rows.append(
            f"| {o.learner} | {variant} | {cnn} | {nme} | {avg:.2f} | {mem['mean_exemplars_per_class']:.2f} "
            f"| {area} | {mem['bytes_used']:,} / {mem['budget_bytes']:,} | {o.wall_s:.0f} |"
        )
    by = {(o.learner, o.variant): o for o in outcomes}
    notes = []
    for learner in dict.fromkeys(o.learner for o in outcomes):
        off = by.get((learner, "off"))
        for o in outcomes:
            if o.learner != learner or o.variant == "off" or off is None:
                continue
            e_off = off.results["phases"][-1]["memory"]["mean_exemplars_per_class"]
            e_on = o.results["phases"][-1]["memory"]["mean_exemplars_per_class"]
            notes.append(
                f"{learner} {o.variant}: {e_on / e_off:.2f}x exemplars per class at the same budget, "
                f"wall time {o.wall_s / off.wall_s:.2f}x of plugin off"
            )
    return "\n".join(rows + [""] + notes)
