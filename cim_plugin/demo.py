"""The built-in demo: plugin off vs on at the same memory budget, on the synthetic set.

A thin call of the ablation runner (``cim_plugin/ablation.py``) on ``exps/<learner>_cim_demo.json``
with one seed (PyCIL's 1993) and, by default, a shared first phase: the ``off`` run trains phase 0
once, and the plugin run starts from that same model and builds its own memory, so the comparison
shows what the memory does rather than first-phase luck (``shared_first_phase=False``: every run
trains its own first phase). Prints and saves a comparison (accuracy per phase, old/new classes,
exemplars per class, bytes against the budget, box diagnostics, wall time) to
``<out>/comparison.md``; each run's files are in ``<out>/runs/<learner>_<variant>_s1993/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import ablation, ablation_report, locate
from .launch import RESULTS_MARK, RunError  # noqa: F401 (RESULTS_MARK: re-exported)

DEMO_LEARNERS = ("icarl", "der", "foster", "lucir")
#: The demo's default variants: plain exemplars, and CIM (PAU branch + bilevel).
VARIANTS = ("off", "pau")
DEMO_SEED = 1993

#: Errors of the demo are those of the runs it launches.
DemoError = RunError


def demo_config(learner: str) -> Path:
    """The shipped demo config of a learner (``exps/<learner>_cim_demo.json``)."""
    path = locate.plugin_dir("exps") / f"{learner}_cim_demo.json"
    if not path.is_file():
        raise DemoError(f"no demo config {path}")
    return path


def run_demo(learners: Sequence[str] = ("icarl",), out_dir: Path | None = None, root: Path | None = None, echo=None,
             variants: Sequence[str] = VARIANTS, shared_first_phase: bool = True, jobs: int = 1) -> list[dict]:
    out_dir = Path(out_dir or Path.cwd() / "cim_demo")
    try:
        outcome, _ = ablation.run_ablation([demo_config(name) for name in learners], variants, (DEMO_SEED,), out_dir,
                                           root=root, echo=echo, shared_first_phase=shared_first_phase, jobs=jobs)
    except ablation.AblationError as err:
        raise DemoError(str(err)) from None
    if outcome["failed"]:
        raise DemoError(f"demo run(s) failed: {', '.join(outcome['failed'])}; see {out_dir / 'runs'}/*/pycil.log")
    runs = ablation_report.collect(out_dir)
    table = comparison_table(runs)
    (out_dir / "comparison.md").write_text(table + "\n")
    print(table)
    print(f"\n[demo] comparison saved to {out_dir / 'comparison.md'}")
    return runs


def _per_phase(phases: list[dict], key: str, fmt: str = "{:.1f}") -> str:
    return " / ".join("-" if p.get(key) is None else fmt.format(p[key]) for p in phases)


def comparison_table(runs: Sequence[dict]) -> str:
    """One row per run (``ablation_report.collect``'s dicts) and, per plugin run, its ratios to off."""
    head = (
        "| learner | variant | CNN top-1 per phase | old / new classes (last phase) | avg inc. CNN | exemplars/class "
        "| box recall / area (last phase) | bytes used / budget | wall s |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in runs:
        res, phases = r["results"], r["results"]["phases"]
        last, s = phases[-1], r["results"]["summary"]
        mem = last["memory"]
        stored = (last.get("diagnostics") or {}).get("stored")
        box = "–" if not stored else f"{stored['mean_box_recall']:.2f} / {stored['mean_box_area']:.2f}"
        old_new = _per_phase([last], "cnn_old_top1") + " / " + _per_phase([last], "cnn_new_top1")
        rows.append(
            f"| {r['learner']} | {r['variant']} | {_per_phase(phases, 'cnn_top1')} | {old_new} "
            f"| {s['avg_incremental_cnn_top1']:.2f} | {mem['mean_exemplars_per_class']:.2f} | {box} "
            f"| {mem['bytes_used']:,} / {mem['budget_bytes']:,} | {s['wall_time_s']:.0f} |"
        )
        del res
    notes = []
    off = {r["learner"]: r for r in runs if r["variant"] == "off"}
    for r in runs:
        base = off.get(r["learner"])
        if base is None or r is base:
            continue
        s, b = r["results"]["summary"], base["results"]["summary"]
        shared = r["results"].get("ablation", {}).get("shared_first_phase")
        gain = s["avg_incremental_cnn_top1"] - b["avg_incremental_cnn_top1"]
        notes.append(
            f"{r['learner']} {r['variant']}: {gain:+.2f} points average incremental CNN vs off"
            + (" (same first-phase model: the difference is the memory's)" if shared else "")
            + f", {s['mean_exemplars_per_class'] / b['mean_exemplars_per_class']:.2f}x exemplars per class at "
            f"{s['bytes_used']:,} / {s['budget_bytes']:,} bytes"
        )
    if any(r["results"].get("ablation", {}).get("shared_first_phase") and r["variant"] != "off" for r in runs):
        notes.append("(plugin runs started from the off run's first phase: their wall times exclude phase-0 "
                     "training and are not overheads; benchmarks/training_overhead.py measures those)")
    return "\n".join(rows + [""] + notes)
