"""PNG figures of ablation results: accuracy per phase, exemplars against bytes, exemplar galleries.

One job: turn already-parsed results into figures. No PyCIL and no torch imports; matplotlib is
used through ``matplotlib.figure.Figure`` (never pyplot), so nothing opens a window and no global
figure state is kept. Each ``plot_*`` function is a thin layer over a pure helper that does the
numbers (``phase_curves``, ``final_memory_points``, ``validate_gallery``) and a ``*_figure``
builder that returns the ``Figure``; PNGs are written atomically.

Input formats
-------------
``runs``: a list of dicts, one per run::

    {"learner": str, "variant": str, "seed": int, "results": dict}

``results`` is a parsed ``results.json`` (see ``cim_plugin.pycil.results``) with at least
``results["phases"]``, a list of per-phase dicts, each with::

    "task": int, "classes": int (classes seen so far), "cnn_top1": float,
    "nme_top1": float | None,
    "memory": {"mean_exemplars_per_class": float, "bytes_used": int, "budget_bytes": int,
               "units_used": float, "budget_units": number}

Runs with zero phases are skipped with a logged warning. Runs of one learner x variant with
different seeds are averaged phase-wise; all runs of one learner must have the same number of
phases, and the seeds of one learner x variant the same ``classes`` per phase (``ValueError``
otherwise). The same (learner, variant, seed) twice is a ``ValueError``. Standard deviations are
over seeds with ``ddof=0`` (0 for a single seed). A ``None`` metric value (e.g. ``nme_top1`` of a
learner without NME) is left out of the mean; a learner x variant with no value at all has no
curve.

``gallery``: a mapping (e.g. ``np.load`` of an ``.npz``) with::

    "labels"          integer [K]
    "originals"       uint8   [K, H, W, 3]
    "cams"            float16/float32 [K, H, W], values in [0, 1]; NaN where there is no CAM
                      (the mask sources uniform and random have none: their rows are all NaN)
    "boxes"           integer [K, 4] as (y0, y1, x0, x1), half-open pixel coordinates,
                      0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W; a box of zero area such as
                      (0, 0, 0, 0) is empty (drawn as "no box")
    "reconstructions" uint8   [K, H, W, 3], the compressed exemplar rebuilt at full size
    "source"          optional: the mask source name, a 0-d str array (or a str)

Bad keys, shapes or dtypes raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_open
from .config import ABLATION_VARIANTS

log = logging.getLogger(__name__)

#: Order of the ablation variants in legends and curves; other variant names come after these, sorted.
VARIANT_ORDER = ABLATION_VARIANTS
#: Colour of each known variant, the same in every figure and subplot.
VARIANT_COLOURS = {
    "off": "#4d4d4d",
    "uniform": "tab:blue",
    "random": "tab:orange",
    "cam": "tab:green",
    "pau": "tab:red",
}
#: Colours given, in turn, to variants not in ``VARIANT_COLOURS`` (cycled if there are more).
EXTRA_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
#: Marker shapes given to learners in order of first appearance (cycled if there are more).
LEARNER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Axis labels of known per-phase metrics; any other metric is labelled by its own name.
METRIC_LABELS = {
    "cnn_top1": "CNN top-1 accuracy (%)",
    "nme_top1": "NME top-1 accuracy (%)",
    "memory.mean_exemplars_per_class": "mean exemplars per class",
}
#: Resolution of every PNG written here.
FIGURE_DPI = 120
#: Size in inches of one accuracy subplot, of one scatter panel and of one gallery cell.
SUBPLOT_SIZE = (4.5, 3.6)
GALLERY_CELL_INCHES = 1.9
#: Opacity of the CAM heat map over the original and of the ±std band.
CAM_ALPHA = 0.5
BAND_ALPHA = 0.2
#: CAM values may sit this far outside [0, 1] (float16 rounding) before validation rejects them.
CAM_RANGE_TOLERANCE = 1e-3
#: Decimal byte units for axis labels, largest first (the axis uses the largest one <= the budget).
BYTE_UNITS = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3), ("B", 1))
#: At most this many ticks on the bytes axis (its labels are long).
BYTES_AXIS_TICKS = 5
#: Names allowed for galleries in ``make_figures`` (they become part of a file name): the ablation's
#: ``<learner>_<variant>``, where a variant can be ``pau+jpeg@30``; no path separators.
GALLERY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.+@-]+")
GALLERY_COLUMNS = ("original", "CAM", "box", "compressed reconstruction")


class Curve(NamedTuple):
    """One learner x variant: classes seen after each phase, mean and std over seeds per phase."""

    classes: np.ndarray
    mean: np.ndarray
    std: np.ndarray


class MemoryPoint(NamedTuple):
    """Final-phase memory figures of one run."""

    learner: str
    variant: str
    seed: int
    bytes_used: int
    budget_bytes: int
    exemplars_per_class: float


# ----------------------------------------------------------------------------------------------
# Pure helpers: runs
# ----------------------------------------------------------------------------------------------


def order_variants(variants: Iterable[str]) -> list[str]:
    """Distinct variant names: those of ``VARIANT_ORDER`` in that order, then the others sorted."""
    names = set(variants)
    known = [v for v in VARIANT_ORDER if v in names]
    return known + sorted(names - set(VARIANT_ORDER))


def variant_colours(variants: Iterable[str]) -> dict[str, str]:
    """A colour per variant: ``VARIANT_COLOURS`` for known ones, ``EXTRA_COLOURS`` in turn for others."""
    ordered = order_variants(variants)
    extra = [v for v in ordered if v not in VARIANT_COLOURS]
    colours = {v: VARIANT_COLOURS[v] for v in ordered if v in VARIANT_COLOURS}
    colours.update({v: EXTRA_COLOURS[i % len(EXTRA_COLOURS)] for i, v in enumerate(extra)})
    return {v: colours[v] for v in ordered}


def learner_markers(learners: Iterable[str]) -> dict[str, str]:
    """A marker shape per learner, in order of first appearance."""
    ordered = list(dict.fromkeys(learners))
    return {name: LEARNER_MARKERS[i % len(LEARNER_MARKERS)] for i, name in enumerate(ordered)}


def _run_name(run: Mapping) -> str:
    return f"learner {run['learner']!r} variant {run['variant']!r} seed {run['seed']!r}"


def usable_runs(runs: Iterable[Mapping]) -> list[Mapping]:
    """The runs that have phases, checked; runs with zero phases are dropped with a warning."""
    kept: list[Mapping] = []
    seen: set[tuple] = set()
    for i, run in enumerate(runs):
        for key in ("learner", "variant", "seed", "results"):
            if key not in run:
                raise ValueError(f"run {i} has no {key!r} key (needs learner, variant, seed, results)")
        results = run["results"]
        if not isinstance(results, Mapping) or "phases" not in results:
            raise ValueError(f"run {i} ({_run_name(run)}): results has no 'phases' list")
        ident = (run["learner"], run["variant"], run["seed"])
        if ident in seen:
            raise ValueError(f"run {i} ({_run_name(run)}) appears twice")
        seen.add(ident)
        if len(results["phases"]) == 0:
            log.warning("skipping %s: its results have no phases", _run_name(run))
            continue
        kept.append(run)
    return kept


def _phase_value(phase: Mapping, metric: str, run: Mapping) -> Any:
    """``phase[metric]``; a dotted metric such as ``memory.bytes_used`` looks into sub-dicts."""
    value: Any = phase
    for part in metric.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(f"{_run_name(run)}: phase {phase.get('task', '?')} has no {metric!r} value")
        value = value[part]
    return value


def _check_phase_counts(runs: list[Mapping]) -> None:
    counts: dict[str, tuple[int, str]] = {}
    for run in runs:
        n = len(run["results"]["phases"])
        first = counts.setdefault(run["learner"], (n, run["variant"]))
        if first[0] != n:
            raise ValueError(
                f"learner {run['learner']!r}: variant {run['variant']!r} seed {run['seed']!r} has {n} "
                f"phases but variant {first[1]!r} has {first[0]}; runs of one learner must have equal phase counts"
            )


def phase_curves(runs: Iterable[Mapping], metric: str = "cnn_top1") -> dict[str, dict[str, Curve]]:
    """Phase-wise mean and std over seeds: ``{learner: {variant: Curve}}``.

    ``metric`` is a key of the phase dicts (``cnn_top1``, ``nme_top1``) or a dotted path into them
    (``memory.mean_exemplars_per_class``). Learners are in order of first appearance, variants as
    in ``order_variants``. ``None`` values are left out of a phase's mean; a phase where every seed
    has ``None`` is NaN, and a learner x variant with no value at all has no entry (nor does a
    learner left without entries).
    """
    runs = usable_runs(runs)
    _check_phase_counts(runs)
    groups: dict[str, dict[str, list[Mapping]]] = {}
    for run in runs:
        groups.setdefault(run["learner"], {}).setdefault(run["variant"], []).append(run)
    curves: dict[str, dict[str, Curve]] = {}
    for learner, by_variant in groups.items():
        for variant in order_variants(by_variant):
            group = by_variant[variant]
            classes = [[int(_phase_value(p, "classes", r)) for p in r["results"]["phases"]] for r in group]
            for run, cls in zip(group[1:], classes[1:]):
                if cls != classes[0]:
                    raise ValueError(
                        f"learner {learner!r} variant {variant!r}: seed {run['seed']!r} has classes per phase "
                        f"{cls} but seed {group[0]['seed']!r} has {classes[0]}"
                    )
            raw = [[_phase_value(p, metric, r) for p in r["results"]["phases"]] for r in group]
            values = np.array([[np.nan if v is None else float(v) for v in row] for row in raw], dtype=float)
            present = ~np.isnan(values)
            if not present.any():
                continue
            count = present.sum(axis=0)
            filled = np.where(present, values, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = filled.sum(axis=0) / count
                var = np.where(present, (values - mean) ** 2, 0.0).sum(axis=0) / count
            mean = np.where(count > 0, mean, np.nan)
            std = np.where(count > 0, np.sqrt(var), np.nan)
            curves.setdefault(learner, {})[variant] = Curve(np.array(classes[0]), mean, std)
    return curves


def seed_counts(runs: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """Number of runs with phases per learner x variant: ``{learner: {variant: n}}``."""
    counts: dict[str, dict[str, int]] = {}
    for run in usable_runs(runs):
        by_variant = counts.setdefault(run["learner"], {})
        by_variant[run["variant"]] = by_variant.get(run["variant"], 0) + 1
    return counts


def has_metric(runs: Iterable[Mapping], metric: str) -> bool:
    """Whether any phase of any run has a non-``None`` value for ``metric`` (a top-level phase key)."""
    return any(p.get(metric) is not None for r in runs for p in r["results"].get("phases", ()))


def byte_unit(n_bytes: float) -> tuple[str, int]:
    """The largest unit of ``BYTE_UNITS`` not above ``n_bytes`` (bytes for anything below 1 kB)."""
    for name, factor in BYTE_UNITS:
        if abs(n_bytes) >= factor:
            return name, factor
    return BYTE_UNITS[-1]


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in its ``byte_unit`` with three significant digits, e.g. ``6.14 MB``."""
    name, factor = byte_unit(n_bytes)
    return f"{n_bytes / factor:.3g} {name}"


def final_memory_points(runs: Iterable[Mapping]) -> list[MemoryPoint]:
    """Final-phase memory figures of every run with phases, in the order given."""
    points = []
    for run in usable_runs(runs):
        last = run["results"]["phases"][-1]
        points.append(
            MemoryPoint(
                learner=run["learner"],
                variant=run["variant"],
                seed=run["seed"],
                bytes_used=int(_phase_value(last, "memory.bytes_used", run)),
                budget_bytes=int(_phase_value(last, "memory.budget_bytes", run)),
                exemplars_per_class=float(_phase_value(last, "memory.mean_exemplars_per_class", run)),
            )
        )
    return points


# ----------------------------------------------------------------------------------------------
# Pure helpers: galleries
# ----------------------------------------------------------------------------------------------


def _source_name(value: Any) -> str:
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "US":
        raise ValueError(f"gallery 'source' must be a str or a 0-d str array, got dtype {arr.dtype} shape {arr.shape}")
    item = arr.item()
    return item.decode() if isinstance(item, bytes) else str(item)


def validate_gallery(gallery: Mapping) -> dict[str, Any]:
    """Checked numpy arrays of a gallery (format in the module docstring); ``source`` is a str or None."""
    required = ("labels", "originals", "cams", "boxes", "reconstructions")
    for key in required:
        if key not in gallery:
            raise ValueError(f"gallery has no {key!r} key (needs {', '.join(required)})")
    out = {key: np.asarray(gallery[key]) for key in required}

    def bad(key: str, expected: str) -> ValueError:
        arr = out[key]
        return ValueError(f"gallery {key!r} must be {expected}, got dtype {arr.dtype} shape {arr.shape}")

    labels, originals = out["labels"], out["originals"]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise bad("labels", "an integer array [K]")
    k = len(labels)
    if k == 0:
        raise ValueError("gallery 'labels' is empty: a gallery needs at least one row")
    if originals.dtype != np.uint8 or originals.ndim != 4 or originals.shape[0] != k or originals.shape[3] != 3:
        raise bad("originals", f"uint8 [K={k}, H, W, 3]")
    h, w = originals.shape[1:3]
    if out["reconstructions"].dtype != np.uint8 or out["reconstructions"].shape != originals.shape:
        raise bad("reconstructions", f"uint8 {list(originals.shape)} (the shape of 'originals')")
    cams = out["cams"]
    if cams.dtype not in (np.float16, np.float32, np.float64) or cams.shape != (k, h, w):
        raise bad("cams", f"float16/float32 [{k}, {h}, {w}]")
    finite = cams[~np.isnan(cams)].astype(np.float64)
    if finite.size and (finite.min() < -CAM_RANGE_TOLERANCE or finite.max() > 1 + CAM_RANGE_TOLERANCE):
        raise ValueError(f"gallery 'cams' must lie in [0, 1] (or be NaN), got {finite.min():.3g}..{finite.max():.3g}")
    boxes = out["boxes"]
    if boxes.dtype.kind not in "iu" or boxes.shape != (k, 4):
        raise bad("boxes", f"an integer array [{k}, 4] of (y0, y1, x0, x1)")
    y0, y1, x0, x1 = boxes.T.astype(np.int64)
    ok = (0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= w)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"gallery 'boxes' row {row} = {boxes[row].tolist()} is not a half-open (y0, y1, x0, x1) box "
            f"inside a {h}x{w} image"
        )
    out["source"] = _source_name(gallery["source"]) if "source" in gallery else None
    return out


def box_rectangle(box: Iterable[int]) -> tuple[float, float, float, float] | None:
    """``(x, y, width, height)`` of a half-open (y0, y1, x0, x1) box in imshow data coordinates
    (pixel centres at integers, so edges at -0.5), or None for an empty box."""
    y0, y1, x0, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        return None
    return (x0 - 0.5, y0 - 0.5, float(x1 - x0), float(y1 - y0))


def has_cam(cam: np.ndarray) -> bool:
    """Whether a CAM has any value (all-NaN means the row's mask source has no CAM)."""
    return bool(np.any(~np.isnan(np.asarray(cam, dtype=np.float32))))


# ----------------------------------------------------------------------------------------------
# Figure builders (return a Figure) and writers (save a PNG)
# ----------------------------------------------------------------------------------------------


def _save_png(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG: {path} must end in .png")
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return path


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def accuracy_figure(runs: Iterable[Mapping], metric: str = "cnn_top1") -> Figure:
    """One subplot per learner (shared y): mean ± std over seeds of ``metric`` per phase per variant."""
    runs = usable_runs(runs)
    curves = phase_curves(runs, metric)
    seeds = seed_counts(runs)
    if not curves:
        raise ValueError(f"no run has {metric!r} values to plot")
    colours = variant_colours(r["variant"] for r in runs)
    width, height = SUBPLOT_SIZE
    fig = Figure(figsize=(width * len(curves) + 1.5, height), layout="constrained")
    axes = fig.subplots(1, len(curves), sharey=True, squeeze=False)[0]
    handles: dict[str, Line2D] = {}
    for ax, (learner, by_variant) in zip(axes, curves.items()):
        for variant, curve in by_variant.items():
            (line,) = ax.plot(curve.classes, curve.mean, marker="o", color=colours[variant], label=variant)
            if seeds[learner][variant] > 1:
                ax.fill_between(curve.classes, curve.mean - curve.std, curve.mean + curve.std,
                                color=colours[variant], alpha=BAND_ALPHA, linewidth=0)
            handles.setdefault(variant, line)
        ax.set_title(learner)
        ax.set_xlabel("classes seen")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_metric_label(metric))
    ordered = [v for v in colours if v in handles]
    fig.legend([handles[v] for v in ordered], ordered, title="variant", loc="outside right center")
    fig.suptitle(f"{_metric_label(metric)} per phase (mean ± std over seeds)")
    return fig


def plot_accuracy_per_phase(runs: Iterable[Mapping], path: str | os.PathLike, metric: str = "cnn_top1") -> Path:
    """Write the accuracy-per-phase figure (``accuracy_figure``) to the PNG ``path``; returns it."""
    return _save_png(accuracy_figure(runs, metric), path)


def memory_figure(runs: Iterable[Mapping], over_phases: bool = True) -> Figure:
    """Final-phase mean exemplars per class against bytes used, one marker per run (colour = variant,
    shape = learner), the budget as a dashed vertical line; with ``over_phases`` a second panel
    shows mean exemplars per class after each phase (mean over seeds)."""
    runs = usable_runs(runs)
    points = final_memory_points(runs)
    if not points:
        raise ValueError("no run has phases: nothing to plot")
    colours = variant_colours(p.variant for p in points)
    markers = learner_markers(p.learner for p in points)
    width, height = SUBPLOT_SIZE
    panels = 2 if over_phases else 1
    fig = Figure(figsize=(width * panels + 2.0, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]

    ax = axes[0]
    budgets = sorted({p.budget_bytes for p in points})
    unit, factor = byte_unit(max(budgets + [p.bytes_used for p in points]))
    for p in points:  # plotted in `unit`; the budget line(s) keep the same scale
        ax.scatter(p.bytes_used / factor, p.exemplars_per_class, color=colours[p.variant], marker=markers[p.learner],
                   s=50, alpha=0.85, edgecolors="black", linewidths=0.5)
    budget_handles = []
    for budget in budgets:
        line = ax.axvline(budget / factor, color="black", linestyle="--", linewidth=1)
        budget_handles.append((line, f"budget {format_bytes(budget)}"))
        ax.annotate("budget", (budget / factor, 1.0), xycoords=("data", "axes fraction"), xytext=(-3, -3),
                    textcoords="offset points", ha="right", va="top", fontsize=8, rotation=90)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=BYTES_AXIS_TICKS))
    ax.set_xlabel(f"memory used after the final phase ({unit})")
    ax.set_ylabel("mean exemplars per class (final phase)")
    ax.set_title("exemplars vs bytes (one marker per run)")
    ax.grid(True, alpha=0.3)

    if over_phases:
        ax2 = axes[1]
        curves = phase_curves(runs, "memory.mean_exemplars_per_class")
        for learner, by_variant in curves.items():
            for variant, curve in by_variant.items():
                ax2.plot(curve.classes, curve.mean, color=colours[variant], marker=markers[learner], markersize=5)
        ax2.set_xlabel("classes seen")
        ax2.set_ylabel("mean exemplars per class")
        ax2.set_title("exemplars per class over phases")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.grid(True, alpha=0.3)

    handles = [Line2D([], [], color=c, marker="o", linestyle="", markeredgecolor="black") for c in colours.values()]
    labels = [f"variant {v}" for v in colours]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="", markeredgecolor="black") for m in markers.values()]
    labels += [f"learner {name}" for name in markers]
    handles += [h for h, _ in budget_handles]
    labels += [text for _, text in budget_handles]
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    return fig


def plot_exemplars_vs_bytes(runs: Iterable[Mapping], path: str | os.PathLike, over_phases: bool = True) -> Path:
    """Write the exemplars-vs-bytes figure (``memory_figure``) to the PNG ``path``; returns it."""
    return _save_png(memory_figure(runs, over_phases), path)


def gallery_figure(gallery: Mapping, max_rows: int = 8) -> Figure:
    """Rows = the first ``max_rows`` exemplars; columns original | CAM | box | reconstruction."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    g = validate_gallery(gallery)
    rows = min(len(g["labels"]), max_rows)
    cols = len(GALLERY_COLUMNS)
    fig = Figure(figsize=(GALLERY_CELL_INCHES * cols, GALLERY_CELL_INCHES * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    note = dict(ha="center", va="center", fontsize=9, color="white",
                bbox=dict(boxstyle="round", facecolor="black", alpha=0.6))
    for i in range(rows):
        original = g["originals"][i]
        row_axes = axes[i]
        for ax in row_axes[:3]:
            ax.imshow(original, interpolation="nearest")
        row_axes[3].imshow(g["reconstructions"][i], interpolation="nearest")
        cam = g["cams"][i].astype(np.float32)
        if has_cam(cam):
            row_axes[1].imshow(cam, cmap="jet", alpha=CAM_ALPHA, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            row_axes[1].text(0.5, 0.5, "no CAM", transform=row_axes[1].transAxes, **note)
        rect = box_rectangle(g["boxes"][i])
        if rect is None:
            row_axes[2].text(0.5, 0.5, "no box", transform=row_axes[2].transAxes, **note)
        else:
            x, y, w, h = rect
            row_axes[2].add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=2))
        for ax in row_axes:
            ax.set_xticks([])
            ax.set_yticks([])
        row_axes[0].set_ylabel(f"class {int(g['labels'][i])}")
    for ax, title in zip(axes[0], GALLERY_COLUMNS):
        ax.set_title(title, fontsize=9)
    shown = f"{rows} of {len(g['labels'])} exemplars"
    fig.suptitle(f"mask source: {g['source']} ({shown})" if g["source"] else f"exemplars ({shown})")
    return fig


def plot_gallery(gallery: Mapping, path: str | os.PathLike, max_rows: int = 8) -> Path:
    """Write the gallery figure (``gallery_figure``) to the PNG ``path``; returns it."""
    return _save_png(gallery_figure(gallery, max_rows), path)


def _gallery_items(galleries: Mapping | Iterable[tuple[str, Mapping]]) -> list[tuple[str, Mapping]]:
    items = list(galleries.items()) if isinstance(galleries, Mapping) else [tuple(item) for item in galleries]
    for name, _ in items:
        if not isinstance(name, str) or not GALLERY_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"gallery name {name!r} must match {GALLERY_NAME_PATTERN.pattern} (it names a file)")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"gallery names must be distinct, got {names}")
    return items


def make_figures(
    runs: Iterable[Mapping],
    out_dir: str | os.PathLike,
    galleries: Mapping[str, Mapping] | Iterable[tuple[str, Mapping]] = (),
) -> list[Path]:
    """Write every figure into ``out_dir`` and return their paths, in this order:
    ``accuracy_per_phase.png`` (CNN), ``accuracy_per_phase_nme.png`` (only if some run has NME
    values), ``exemplars_vs_bytes.png``, then ``gallery_<name>.png`` per gallery (``galleries``: a
    mapping or (name, gallery) pairs). With no run that has phases, the run figures are skipped
    with a warning."""
    out_dir = Path(out_dir)
    items = _gallery_items(galleries)
    runs = usable_runs(runs)
    paths: list[Path] = []
    if runs:
        paths.append(plot_accuracy_per_phase(runs, out_dir / "accuracy_per_phase.png", "cnn_top1"))
        if has_metric(runs, "nme_top1"):
            paths.append(plot_accuracy_per_phase(runs, out_dir / "accuracy_per_phase_nme.png", "nme_top1"))
        paths.append(plot_exemplars_vs_bytes(runs, out_dir / "exemplars_vs_bytes.png"))
    else:
        log.warning("no run has phases: writing no accuracy or memory figures")
    for name, gallery in items:
        paths.append(plot_gallery(gallery, out_dir / f"gallery_{name}.png"))
    return paths
