"""The ablation's tables and figures, from the finished runs of its output folder.

``<out>/runs/*/results.json`` (written by ablation.py, each with an ``ablation`` entry naming its
learner, variant and seed) → ``runs.csv`` (one row per run), ``aggregate.csv`` and ``aggregate.md``
(mean ± std over seeds per learner × variant, the gain split into first and later phases, old- and
new-class accuracy per phase, every two variants paired by seed) and ``figures/``. No PyCIL, no torch import.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .atomic import atomic_open
from .config import ALL_VARIANTS, SUPPORTED_LEARNERS
from .metrics import mean_std

log = logging.getLogger(__name__)

#: Figures summarised per learner × variant: (results.json summary key, column title).
SUMMARY_METRICS = (
    ("avg_incremental_cnn_top1", "avg inc. CNN"),
    ("last_cnn_top1", "last CNN"),
    ("avg_incremental_nme_top1", "avg inc. NME"),
    ("last_nme_top1", "last NME"),
    ("forgetting_cnn", "forgetting CNN"),
    ("mean_exemplars_per_class", "exemplars/class"),
    ("bytes_used", "bytes used"),
    ("wall_time_s", "wall s"),
    ("first_phase_cnn_top1", "first-phase CNN"),
    ("later_phases_avg_cnn_top1", "later phases CNN"),
    ("later_phases_old_cnn_top1", "later old CNN"),
    ("later_phases_new_cnn_top1", "later new CNN"),
    ("stored_box_recall", "box recall"),
    ("stored_box_area", "box area"),
    ("stored_psnr_db", "PSNR dB"),
)



def learner_rank(learner: str) -> tuple[int, str]:
    return (SUPPORTED_LEARNERS.index(learner) if learner in SUPPORTED_LEARNERS else len(SUPPORTED_LEARNERS), learner)


def variant_rank(variant: str) -> tuple[int, int, int, str]:
    """Table order: the known variants in ``VARIANTS`` order, a codec variant after its mask source,
    qualities (``@q``) rising after the variant without one."""
    name, _, quality = variant.partition("@")
    base, _, codec = name.partition("+")
    return (ALL_VARIANTS.index(base) if base in ALL_VARIANTS else len(ALL_VARIANTS), 1 if codec else 0,
            int(quality) if quality.isdigit() else -1, variant)



def collect(out: Path) -> list[dict]:
    """Finished runs in ``<out>/runs`` as the figures module's run dicts, in table order."""
    runs = []
    for path in sorted((Path(out) / "runs").glob("*/results.json")):
        try:
            results = json.loads(path.read_text())
        except ValueError:
            log.warning("ablation: %s is unreadable; left out", path)
            continue
        run = results.get("ablation")  # written by _run_one together with the finished results
        if results.get("finished") is not True or not isinstance(run, dict):
            continue
        runs.append({"learner": run["learner"], "variant": run["variant"], "seed": run["seed"],
                     "results": results, "dir": path.parent})
    runs.sort(key=lambda r: (learner_rank(r["learner"]), variant_rank(r["variant"]), r["seed"]))
    return runs


def aggregate(runs: Sequence[dict]) -> list[dict]:
    """One row per learner × variant: mean, std and count over seeds of every SUMMARY_METRICS
    figure, the budget, and the exemplar and wall-time ratios to the learner's "off" row."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["learner"], r["variant"]), []).append(r)
    rows = []
    for (learner, variant), members in groups.items():
        row: dict[str, Any] = {"learner": learner, "variant": variant,
                               "seeds": " ".join(str(m["seed"]) for m in members), "n_seeds": len(members)}
        for key, _ in SUMMARY_METRICS:
            mean, std, _n = mean_std([m["results"].get("summary", {}).get(key) for m in members])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        row["budget_bytes"] = members[0]["results"].get("summary", {}).get("budget_bytes")
        rows.append(row)
    # paired by seed (same first phase in shared mode): variant minus off of the same seed
    off_by_seed = {(r["learner"], r["seed"]): r["results"].get("summary", {}) for r in runs if r["variant"] == "off"}
    for row, ((learner, variant), members) in zip(rows, groups.items()):
        for key in ("later_phases_avg_cnn_top1", "avg_incremental_cnn_top1"):
            diffs = []
            for m in members:
                base_s = off_by_seed.get((learner, m["seed"]), {})
                a, b = m["results"].get("summary", {}).get(key), base_s.get(key)
                if a is not None and b is not None and variant != "off":
                    diffs.append(a - b)
            mean, std, n = mean_std(diffs) if diffs else (None, None, 0)
            row[f"{key}_paired_delta_mean"], row[f"{key}_paired_delta_std"], row[f"{key}_paired_n"] = mean, std, n
    off = {r["learner"]: r for r in rows if r["variant"] == "off"}
    for row in rows:
        base = off.get(row["learner"])
        for key, name in (("mean_exemplars_per_class", "exemplar_ratio_vs_off"), ("wall_time_s", "wall_ratio_vs_off")):
            a, b = row[f"{key}_mean"], base[f"{key}_mean"] if base else None
            row[name] = a / b if a is not None and b else None
    return rows


def per_run_rows(runs: Sequence[dict]) -> list[dict]:
    rows = []
    for r in runs:
        s = r["results"].get("summary", {})
        rows.append({"learner": r["learner"], "variant": r["variant"], "seed": r["seed"],
                     **{key: s.get(key) for key, _ in SUMMARY_METRICS}, "budget_bytes": s.get("budget_bytes")})
    return rows


def to_csv(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _pm(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "–"
    return fmt.format(mean) + (" ± " + fmt.format(std) if row["n_seeds"] > 1 else "")


def markdown_table(rows: Sequence[dict]) -> str:
    """Mean ± std over seeds, one row per learner × variant."""
    head = ("| learner | variant | seeds | avg inc. CNN | last CNN | avg inc. NME | last NME | forgetting CNN "
            "| exemplars/class | ×off | bytes used / budget | wall s | ×off |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ratio = lambda k: "–" if r.get(k) is None else f"{r[k]:.2f}"  # noqa: E731
        budget = "–" if r.get("budget_bytes") is None else f"{r['budget_bytes']:,}"
        used = "–" if r.get("bytes_used_mean") is None else f"{r['bytes_used_mean']:,.0f}"
        lines.append(
            f"| {r['learner']} | {r['variant']} | {r['n_seeds']} | {_pm(r, 'avg_incremental_cnn_top1')} "
            f"| {_pm(r, 'last_cnn_top1')} | {_pm(r, 'avg_incremental_nme_top1')} | {_pm(r, 'last_nme_top1')} "
            f"| {_pm(r, 'forgetting_cnn')} | {_pm(r, 'mean_exemplars_per_class', '{:.1f}')} "
            f"| {ratio('exemplar_ratio_vs_off')} | {used} / {budget} | {_pm(r, 'wall_time_s', '{:.0f}')} "
            f"| {ratio('wall_ratio_vs_off')} |"
        )
    return "\n".join(lines)


def gain_table(rows: Sequence[dict]) -> str:
    """The gain split: first phase vs later phases (Δ to the learner's off row), old- and
    new-class accuracy of the later phases, and the stored boxes' diagnostics."""
    head = ("| learner | variant | first-phase CNN | later phases CNN | Δ later vs off (paired by seed) | later old CNN "
            "| later new CNN | box recall | box area | PSNR dB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        d_mean, d_std = r.get("later_phases_avg_cnn_top1_paired_delta_mean"), r.get("later_phases_avg_cnn_top1_paired_delta_std")
        n = r.get("later_phases_avg_cnn_top1_paired_n", 0)
        delta = "–" if d_mean is None else f"{d_mean:+.2f}" + (f" ± {d_std:.2f}" if n > 1 else "") + f" (n={n})"
        lines.append(
            f"| {r['learner']} | {r['variant']} | {_pm(r, 'first_phase_cnn_top1')} | {_pm(r, 'later_phases_avg_cnn_top1')} "
            f"| {delta} | {_pm(r, 'later_phases_old_cnn_top1')} | {_pm(r, 'later_phases_new_cnn_top1')} "
            f"| {_pm(r, 'stored_box_recall', '{:.3f}')} | {_pm(r, 'stored_box_area', '{:.3f}')} | {_pm(r, 'stored_psnr_db', '{:.1f}')} |"
        )
    return "\n".join(lines)


def phase_table(runs: Sequence[dict]) -> str:
    """Old- and new-class CNN top-1 per phase (mean over seeds), one row per learner × variant:
    where the memory's effect shows (old classes) and what it costs the new ones."""
    groups: dict[tuple[str, str], list[list[dict]]] = {}
    for r in runs:
        groups.setdefault((r["learner"], r["variant"]), []).append(r["results"].get("phases", []))
    n_phases = max((len(p) for members in groups.values() for p in members), default=0)
    head = "| learner | variant | " + " | ".join(f"phase {k} old / new" for k in range(1, n_phases)) + " |"
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for (learner, variant), members in groups.items():
        cells = []
        for k in range(1, n_phases):
            parts = []
            for key in ("cnn_old_top1", "cnn_new_top1"):
                mean, _, n = mean_std([p[k].get(key) for p in members if len(p) > k])
                parts.append("–" if mean is None else f"{mean:.1f}")
            cells.append(" / ".join(parts))
        lines.append(f"| {learner} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pair_table(runs: Sequence[dict]) -> str:
    """Every two variants of a learner, paired by seed (with a shared first phase both started from
    the same model, so the difference is the memories'): the later variant in table order minus the
    earlier, average incremental CNN and NME per seed, their mean ± std, and in how many seeds the
    later one is ahead. Pairs without a common seed are left out."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in runs:
        by.setdefault((r["learner"], r["variant"]), {})[r["seed"]] = r["results"].get("summary", {})
    head = ("| learner | pair | seeds | Δ avg inc. CNN per seed | mean ± std | ahead | Δ avg inc. NME per seed "
            "| mean ± std | ahead |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    keys = sorted(by, key=lambda k: (learner_rank(k[0]), variant_rank(k[1])))
    for i, (learner, first) in enumerate(keys):
        for other_learner, second in keys[i + 1:]:
            if other_learner != learner:
                continue
            seeds = sorted(set(by[learner, first]) & set(by[learner, second]))
            if not seeds:
                continue
            cells = []
            for key in ("avg_incremental_cnn_top1", "avg_incremental_nme_top1"):
                diffs = [None if a is None or b is None else a - b
                         for a, b in ((by[learner, second][s].get(key), by[learner, first][s].get(key)) for s in seeds)]
                known = [d for d in diffs if d is not None]
                mean, std, n = mean_std(known) if known else (None, None, 0)
                cells += [", ".join("–" if d is None else f"{d:+.2f}" for d in diffs),
                          "–" if mean is None else f"{mean:+.2f}" + (f" ± {std:.2f}" if n > 1 else ""),
                          f"{sum(d > 0 for d in known)} of {n}"]
            lines.append(f"| {learner} | {second} − {first} | {' '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: Path, figures: bool = True) -> dict[str, Path]:
    """Write runs.csv, aggregate.csv, aggregate.md and (optionally) the figures from the
    finished runs in ``out``; returns the written paths by name."""
    out = Path(out)
    runs = collect(out)
    if not runs:
        from .ablation import AblationError  # ablation.py imports this module

        raise AblationError(f"no finished runs in {out / 'runs'}")
    rows = aggregate(runs)
    written = {}
    for name, text in (("runs.csv", to_csv(per_run_rows(runs))), ("aggregate.csv", to_csv(rows)),
                       ("aggregate.md", "\n\n".join((markdown_table(rows), gain_table(rows), phase_table(runs), pair_table(runs))) + "\n")):
        with atomic_open(out / name, "w") as f:
            f.write(text)
        written[name] = out / name
    if figures:
        from . import figures as fig
        import numpy as np

        galleries = {}
        for r in runs:  # one gallery per learner × plugin variant: its first seed's
            key = f"{r['learner']}_{r['variant']}"
            path = r["dir"] / "gallery.npz"
            if key not in galleries and path.is_file():
                with np.load(path) as data:
                    galleries[key] = {k: data[k] for k in data.files}
        plain = [{k: r[k] for k in ("learner", "variant", "seed", "results")} for r in runs]
        for path in fig.make_figures(plain, out / "figures", galleries):
            written[path.name] = path
    return written
