"""Figures of ablation results: the numeric helpers exactly, the figures as valid, non-trivial PNGs."""

import copy
import logging

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.patches import Rectangle

from cim_plugin import figures

LEARNERS = ("icarl", "foster")
VARIANTS = ("pau", "off", "cam")  # deliberately not in VARIANT_ORDER
SEEDS = (0, 1)
CLASSES = (10, 20)
BASE = {"off": 80.0, "cam": 82.0, "pau": 84.0}
LEARNER_OFFSET = {"icarl": 0.0, "foster": 1.0}
BUDGET = 2000 * 32 * 32 * 3


def cnn_value(learner, variant, seed, phase):
    return BASE[variant] + LEARNER_OFFSET[learner] - 10.0 * phase + 2.0 * seed


def exemplars(variant, seed, phase):
    return (20.0 if variant == "off" else 30.0 + seed) / (phase + 1)


def make_run(learner, variant, seed, n_phases=2, nme=True):
    phases = []
    for t in range(n_phases):
        used = BUDGET if variant == "off" else BUDGET - 1000 * (seed + 1)
        phases.append({
            "task": t,
            "classes": CLASSES[0] * (t + 1),
            "cnn_top1": cnn_value(learner, variant, seed, t),
            "nme_top1": (cnn_value(learner, variant, seed, t) - 1.0) if nme else None,
            "memory": {
                "mean_exemplars_per_class": exemplars(variant, seed, t),
                "bytes_used": used,
                "budget_bytes": BUDGET,
                "units_used": used / (32 * 32 * 3),
                "budget_units": 2000,
            },
        })
    return {"learner": learner, "variant": variant, "seed": seed, "results": {"phases": phases}}


@pytest.fixture
def runs():
    """2 learners x 3 variants x 2 seeds, 2 phases; foster has no NME (as without NME)."""
    return [make_run(le, v, s, nme=(le == "icarl")) for le in LEARNERS for v in VARIANTS for s in SEEDS]


@pytest.fixture
def gallery():
    """4 exemplars of 32x32: row 1 has no CAM (all NaN), row 2 an empty box."""
    rng = np.random.default_rng(0)
    k, h, w = 4, 32, 32
    originals = rng.integers(0, 256, size=(k, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cams = np.stack([np.exp(-((yy - 8 * (i + 1)) ** 2 + (xx - 16) ** 2) / 60.0) for i in range(k)]).astype(np.float16)
    cams[1] = np.nan
    boxes = np.array([[4, 14, 10, 22], [0, 32, 0, 32], [0, 0, 0, 0], [20, 30, 5, 27]], dtype=np.int64)
    reconstructions = (originals // 32 * 32).astype(np.uint8)
    return {
        "labels": np.array([3, 7, 7, 12], dtype=np.int64),
        "originals": originals,
        "cams": cams,
        "boxes": boxes,
        "reconstructions": reconstructions,
        "source": np.array("cam"),
    }


def read_png(path):
    assert path.exists()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # not a blank canvas
    return image


# --- numeric helpers ---------------------------------------------------------------------------


def test_phase_curves_mean_std_and_order(runs):
    curves = figures.phase_curves(runs, "cnn_top1")
    assert list(curves) == ["icarl", "foster"]
    for learner in LEARNERS:
        assert list(curves[learner]) == ["off", "cam", "pau"]
        for variant in VARIANTS:
            c = curves[learner][variant]
            np.testing.assert_array_equal(c.classes, [10, 20])
            # seeds 0 and 2 points apart: mean in the middle, population std 1
            expected = [cnn_value(learner, variant, 0, t) + 1.0 for t in range(2)]
            np.testing.assert_array_equal(c.mean, expected)
            np.testing.assert_array_equal(c.std, [1.0, 1.0])


def test_phase_curves_nested_metric_and_single_seed(runs):
    one_seed = [r for r in runs if r["seed"] == 0]
    curves = figures.phase_curves(one_seed, "memory.mean_exemplars_per_class")
    classes, mean, std = curves["foster"]["cam"]
    np.testing.assert_array_equal(classes, [10, 20])
    np.testing.assert_array_equal(mean, [30.0, 15.0])
    np.testing.assert_array_equal(std, [0.0, 0.0])
    assert figures.seed_counts(one_seed)["foster"] == {"pau": 1, "off": 1, "cam": 1}
    assert figures.seed_counts(runs)["icarl"]["off"] == 2


def test_phase_curves_leave_out_none_values(runs):
    curves = figures.phase_curves(runs, "nme_top1")
    assert list(curves) == ["icarl"]  # foster has no NME value at all
    np.testing.assert_array_equal(curves["icarl"]["off"].mean, [80.0, 70.0])
    # one seed without NME in one phase: that phase's mean is the other seed's value
    runs[0]["results"]["phases"][1]["nme_top1"] = None  # icarl pau seed 0
    c = figures.phase_curves(runs, "nme_top1")["icarl"]["pau"]
    np.testing.assert_array_equal(c.mean, [84.0, 75.0])
    np.testing.assert_array_equal(c.std, [1.0, 0.0])
    assert figures.has_metric(runs, "nme_top1")
    assert not figures.has_metric([r for r in runs if r["learner"] == "foster"], "nme_top1")


def test_mismatched_phase_counts_raise(runs):
    runs.append(make_run("foster", "pau", 7, n_phases=3))
    with pytest.raises(ValueError, match=r"foster.*pau.*seed 7.*3 phases"):
        figures.phase_curves(runs)


def test_mismatched_classes_between_seeds_raise(runs):
    runs[-1]["results"]["phases"][1]["classes"] = 25
    with pytest.raises(ValueError, match=r"foster.*cam.*classes"):
        figures.phase_curves(runs)


def test_duplicate_run_and_missing_keys_raise(runs):
    with pytest.raises(ValueError, match="appears twice"):
        figures.phase_curves(runs + [copy.deepcopy(runs[0])])
    broken = copy.deepcopy(runs[0])
    del broken["seed"]
    with pytest.raises(ValueError, match="'seed'"):
        figures.phase_curves([broken])
    del runs[0]["results"]["phases"][0]["cnn_top1"]
    with pytest.raises(ValueError, match="cnn_top1"):
        figures.phase_curves(runs)


def test_zero_phase_runs_skipped_with_warning(runs, caplog):
    empty = make_run("icarl", "off", 5, n_phases=0)
    with caplog.at_level(logging.WARNING, logger="cim_plugin.figures"):
        curves = figures.phase_curves(runs + [empty])
    assert "no phases" in caplog.text and "seed 5" in caplog.text
    assert figures.seed_counts(runs + [empty])["icarl"]["off"] == 2
    np.testing.assert_array_equal(curves["icarl"]["off"].std, [1.0, 1.0])
    assert figures.phase_curves([empty]) == {}


def test_variant_order_and_colours():
    assert figures.order_variants(["pau", "zeta", "off", "alpha", "cam", "pau"]) == ["off", "cam", "pau", "alpha", "zeta"]
    everything = figures.variant_colours(["pau", "zeta", "off", "alpha"])
    subset = figures.variant_colours(["pau"])
    assert everything["pau"] == subset["pau"] == figures.VARIANT_COLOURS["pau"]
    assert everything["alpha"] == figures.EXTRA_COLOURS[0] and everything["zeta"] == figures.EXTRA_COLOURS[1]
    assert len(set(everything.values())) == 4
    assert figures.learner_markers(["b", "a", "b"]) == {"b": figures.LEARNER_MARKERS[0], "a": figures.LEARNER_MARKERS[1]}


def test_final_memory_points(runs):
    points = figures.final_memory_points(runs)
    assert len(points) == 12
    p = next(p for p in points if (p.learner, p.variant, p.seed) == ("foster", "pau", 1))
    assert p == figures.MemoryPoint("foster", "pau", 1, BUDGET - 2000, BUDGET, 15.5)


def test_byte_units():
    assert figures.byte_unit(6_144_000) == ("MB", 10**6)
    assert figures.byte_unit(999) == ("B", 1) and figures.byte_unit(0) == ("B", 1)
    assert figures.format_bytes(6_144_000) == "6.14 MB"
    assert figures.format_bytes(2_500_000_000) == "2.5 GB"
    assert figures.format_bytes(3072) == "3.07 kB"


def test_box_rectangle_and_has_cam():
    assert figures.box_rectangle((2, 5, 3, 7)) == (2.5, 1.5, 4.0, 3.0)
    assert figures.box_rectangle((0, 0, 0, 0)) is None
    assert figures.box_rectangle((4, 9, 6, 6)) is None
    assert not figures.has_cam(np.full((4, 4), np.nan, dtype=np.float16))
    partial = np.full((4, 4), np.nan, dtype=np.float32)
    partial[0, 0] = 0.5
    assert figures.has_cam(partial)


# --- gallery validation --------------------------------------------------------------------------


def _drop(g, key):
    del g[key]


@pytest.mark.parametrize(
    "key, spoil",
    [
        ("cams", lambda g: _drop(g, "cams")),
        ("labels", lambda g: g.update(labels=g["labels"].astype(np.float32))),
        ("originals", lambda g: g.update(originals=g["originals"].astype(np.float32))),
        ("originals", lambda g: g.update(originals=g["originals"][..., :1])),
        ("reconstructions", lambda g: g.update(reconstructions=g["reconstructions"][:, :16])),
        ("cams", lambda g: g.update(cams=g["cams"][:, :, :16])),
        ("cams", lambda g: g.update(cams=g["cams"].astype(np.float32) * 5)),
        ("boxes", lambda g: g.update(boxes=g["boxes"][:, :3])),
        ("boxes", lambda g: g["boxes"].__setitem__((3, 1), 33)),
        ("boxes", lambda g: g["boxes"].__setitem__(0, [9, 4, 0, 5])),
        ("source", lambda g: g.update(source=np.array([1, 2]))),
    ],
)
def test_validate_gallery_names_the_bad_key(gallery, key, spoil):
    figures.validate_gallery(gallery)  # the unspoilt gallery is fine
    spoil(gallery)
    with pytest.raises(ValueError, match=f"'{key}'"):
        figures.validate_gallery(gallery)


def test_validate_gallery_from_npz(gallery, tmp_path):
    np.savez(tmp_path / "g.npz", **gallery)
    with np.load(tmp_path / "g.npz") as loaded:
        checked = figures.validate_gallery(loaded)
    assert checked["source"] == "cam"
    del gallery["source"]
    assert figures.validate_gallery(gallery)["source"] is None


# --- figures -------------------------------------------------------------------------------------


def test_accuracy_figure_layout(runs):
    fig = figures.accuracy_figure(runs)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["icarl", "foster"]
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    for ax in axes:
        assert len(ax.lines) == 3 and len(ax.collections) == 3  # a line and a ±std band per variant
        colours = {line.get_label(): line.get_color() for line in ax.lines}
        assert colours == {v: figures.VARIANT_COLOURS[v] for v in VARIANTS}
        np.testing.assert_array_equal(ax.lines[0].get_xdata(), [10, 20])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["off", "cam", "pau"]
    single = figures.accuracy_figure([r for r in runs if r["seed"] == 0])
    assert all(len(ax.collections) == 0 for ax in single.axes)  # no band for a single seed


def test_plot_accuracy_per_phase_png(runs, tmp_path):
    path = figures.plot_accuracy_per_phase(runs, tmp_path / "acc.png")
    assert path == tmp_path / "acc.png"
    read_png(path)
    nme = figures.plot_accuracy_per_phase(runs, tmp_path / "nme.png", metric="nme_top1")
    read_png(nme)
    with pytest.raises(ValueError, match="nme_top1"):
        figures.accuracy_figure([r for r in runs if r["learner"] == "foster"], "nme_top1")
    with pytest.raises(ValueError, match="PNG"):
        figures.plot_accuracy_per_phase(runs, tmp_path / "acc.pdf")


def test_memory_figure_layout_and_png(runs, tmp_path):
    fig = figures.memory_figure(runs)
    scatter_ax, phases_ax = fig.axes
    assert len(scatter_ax.collections) == 12  # one marker per run
    budget_lines = [line for line in scatter_ax.lines if line.get_linestyle() == "--"]
    assert len(budget_lines) == 1 and budget_lines[0].get_xdata()[0] == BUDGET / 1e6  # axis in MB
    assert scatter_ax.get_xlabel().endswith("(MB)")
    assert sorted({o.get_offsets()[0, 0] for o in scatter_ax.collections}) == [(BUDGET - 2000) / 1e6, (BUDGET - 1000) / 1e6, BUDGET / 1e6]
    assert len(phases_ax.lines) == 6  # learner x variant
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:5] == ["variant off", "variant cam", "variant pau", "learner icarl", "learner foster"]
    assert labels[5].startswith("budget")
    assert len(figures.memory_figure(runs, over_phases=False).axes) == 1
    read_png(figures.plot_exemplars_vs_bytes(runs, tmp_path / "mem.png"))


def test_gallery_figure_layout(gallery):
    fig = figures.gallery_figure(gallery)
    assert len(fig.axes) == 4 * 4
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("no CAM") == 1 and texts.count("no box") == 1
    rows = [fig.axes[4 * i: 4 * i + 4] for i in range(4)]
    assert [r[0].get_ylabel() for r in rows] == ["class 3", "class 7", "class 7", "class 12"]
    assert [ax.get_title() for ax in rows[0]] == list(figures.GALLERY_COLUMNS)
    assert len(rows[0][1].images) == 2 and len(rows[1][1].images) == 1  # CAM overlay / none
    boxes = [p for r in rows for p in r[2].patches if isinstance(p, Rectangle)]
    assert len(boxes) == 3
    assert boxes[0].get_xy() == (9.5, 3.5) and boxes[0].get_width() == 12 and boxes[0].get_height() == 10
    np.testing.assert_array_equal(rows[0][3].images[0].get_array(), gallery["reconstructions"][0])
    assert "cam" in fig._suptitle.get_text()


def test_plot_gallery_png_and_max_rows(gallery, tmp_path):
    full = read_png(figures.plot_gallery(gallery, tmp_path / "g.png"))
    short = read_png(figures.plot_gallery(gallery, tmp_path / "g2.png", max_rows=2))
    assert short.shape[0] < full.shape[0]
    assert len(figures.gallery_figure(gallery, max_rows=2).axes) == 8
    with pytest.raises(ValueError, match="max_rows"):
        figures.plot_gallery(gallery, tmp_path / "g3.png", max_rows=0)


def test_make_figures(runs, gallery, tmp_path):
    paths = figures.make_figures(runs, tmp_path / "figs", galleries={"cam": gallery})
    names = [p.name for p in paths]
    assert names == ["accuracy_per_phase.png", "accuracy_per_phase_nme.png", "exemplars_vs_bytes.png", "gallery_cam.png"]
    for p in paths:
        read_png(p)
    no_nme = [make_run(le, v, s, nme=False) for le in LEARNERS for v in VARIANTS for s in SEEDS]
    paths = figures.make_figures(no_nme, tmp_path / "figs2", galleries=[("a", gallery), ("b", gallery)])
    assert [p.name for p in paths] == ["accuracy_per_phase.png", "exemplars_vs_bytes.png", "gallery_a.png", "gallery_b.png"]
    assert not (tmp_path / "figs2" / "accuracy_per_phase_nme.png").exists()
    assert [p.name for p in figures.make_figures([], tmp_path / "figs3", {"x": gallery})] == ["gallery_x.png"]
    with pytest.raises(ValueError, match="gallery name"):
        figures.make_figures(runs, tmp_path / "figs4", galleries={"../evil": gallery})
    # the ablation names a gallery <learner>_<variant>, and a codec variant reads pau+jpeg@30
    coded = figures.make_figures([], tmp_path / "figs5", {"icarl_pau+jpeg@30": gallery})
    assert [p.name for p in coded] == ["gallery_icarl_pau+jpeg@30.png"]
