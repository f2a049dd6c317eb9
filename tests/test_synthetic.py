"""Tests of the synthetic cluttered-objects dataset (cim_plugin.data.synthetic)."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cim_plugin.data import synthetic
from cim_plugin.data.synthetic import (
    COLOURS,
    SHAPES,
    TEXTURES,
    SyntheticData,
    SyntheticSpec,
    class_attributes,
    class_name,
    default_cache_dir,
    generate,
    load_synthetic,
    max_classes,
)

SMALL = SyntheticSpec(num_classes=3, image_size=40, train_per_class=4, test_per_class=2, seed=0)
FIELDS = ("train_x", "train_y", "test_x", "test_y", "train_boxes", "test_boxes")


def assert_data_equal(a: SyntheticData, b: SyntheticData) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        np.testing.assert_array_equal(x, y, err_msg=f)
    assert a.class_names == b.class_names


def digest(d: SyntheticData) -> str:
    h = hashlib.sha256()
    for f in FIELDS:
        h.update(np.ascontiguousarray(getattr(d, f)).tobytes())
    h.update("|".join(d.class_names).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Classes


def test_class_enumeration_is_a_fixed_bijection_and_spread_out():
    combos = [class_attributes(k) for k in range(max_classes())]
    assert max_classes() == len(SHAPES) * len(TEXTURES) * len(COLOURS)
    assert len(set(combos)) == max_classes()  # every combination exactly once
    # The first four classes differ in every attribute; the first ten in at least two.
    for i in range(10):
        for j in range(i):
            diff = sum(a != b for a, b in zip(combos[i], combos[j]))
            assert diff >= (3 if i < 4 else 2), (i, j, combos[i], combos[j])
    # Class k always maps to the same combination (fixed order; changing it needs a new
    # FORMAT_VERSION because cached datasets and class names depend on it).
    assert [class_name(k) for k in range(5)] == [
        "red-solid-disc", "green-striped-square", "blue-checkered-triangle",
        "yellow-dotted-cross", "magenta-solid-ring"]
    with pytest.raises(ValueError, match="192"):
        class_attributes(max_classes())


# ------------------------------------------------------------------------------------------------
# Generation


def test_generate_is_deterministic_and_seed_dependent():
    a, b = generate(SMALL), generate(SMALL)
    assert_data_equal(a, b)
    c = generate(SyntheticSpec(**{**SMALL.__dict__, "seed": 1}))
    assert not np.array_equal(a.train_x, c.train_x)
    assert not np.array_equal(a.test_x, c.test_x)
    assert not np.array_equal(a.train_x[: len(a.test_x)], a.test_x)  # independent split streams


def test_generate_golden_digest():
    # Byte-identical on every machine: a failure here means either the rendering changed (then
    # bump FORMAT_VERSION and update the digest) or this platform renders differently.
    assert digest(generate(SMALL)) == (
        "2817d9e362e401c6c8aad82a0eaf9e99dbbe2f1f6b5454cc488649df3b8ab4d2")


def test_shapes_dtypes_and_balanced_labels():
    spec = SyntheticSpec(num_classes=5, image_size=48, train_per_class=6, test_per_class=3)
    d = generate(spec)
    assert d.train_x.shape == (30, 48, 48, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (15, 48, 48, 3) and d.test_x.dtype == np.uint8
    assert d.train_y.dtype == np.int64 and d.test_y.dtype == np.int64
    assert d.train_boxes.shape == (30, 4) and d.train_boxes.dtype == np.int64
    assert d.test_boxes.shape == (15, 4) and d.test_boxes.dtype == np.int64
    assert np.bincount(d.train_y).tolist() == [6] * 5
    assert np.bincount(d.test_y).tolist() == [3] * 5
    assert d.class_names == [class_name(k) for k in range(5)]
    assert d.train_x.std() > 20  # not a blank canvas


def test_streams_are_independent_per_split_and_class():
    base = generate(SMALL)
    more_test = generate(SyntheticSpec(**{**SMALL.__dict__, "test_per_class": 5}))
    np.testing.assert_array_equal(base.train_x, more_test.train_x)
    np.testing.assert_array_equal(base.train_boxes, more_test.train_boxes)
    # Growing a split appends images per class without changing the earlier ones.
    more_train = generate(SyntheticSpec(**{**SMALL.__dict__, "train_per_class": 6}))
    for k in range(SMALL.num_classes):
        np.testing.assert_array_equal(base.train_x[base.train_y == k],
                                      more_train.train_x[more_train.train_y == k][:4])
    np.testing.assert_array_equal(base.test_x, more_train.test_x)
    # Fewer classes: the remaining classes are unchanged.
    fewer = generate(SyntheticSpec(**{**SMALL.__dict__, "num_classes": 2}))
    np.testing.assert_array_equal(fewer.train_x, base.train_x[base.train_y < 2])


@pytest.mark.parametrize("size", [32, 96, 256])
def test_object_boxes_inside_image_with_side_fraction_in_range(size):
    per = 40 if size < 256 else 6
    d = generate(SyntheticSpec(num_classes=8, image_size=size, train_per_class=per,
                               test_per_class=2))
    for boxes in (d.train_boxes, d.test_boxes):
        y0, y1, x0, x1 = boxes.T
        assert (y0 >= 0).all() and (x0 >= 0).all()
        assert (y1 <= size).all() and (x1 <= size).all()
        h, w = (y1 - y0) / size, (x1 - x0) / size
        tol = 1.0 / size
        assert (h >= 0.15 - tol).all() and (h <= 0.40 + tol).all(), (h.min(), h.max())
        assert (w >= 0.15 - tol).all() and (w <= 0.40 + tol).all(), (w.min(), w.max())
    if size == 96:  # sizes spread over the range, positions over the image
        side = d.train_boxes[:, 1] - d.train_boxes[:, 0]
        assert side.min() <= 0.2 * size and side.max() >= 0.35 * size
        centre = (d.train_boxes[:, 0] + d.train_boxes[:, 1]) / 2 / size
        assert centre.min() < 0.3 and centre.max() > 0.7


def _class_colour_fraction(img: np.ndarray, rgb: np.ndarray) -> float:
    """Share of pixels whose colour points in the class colour's direction (either shade)."""
    px = img.reshape(-1, 3).astype(np.float64)
    norm = np.linalg.norm(px, axis=1) + 1e-9
    cos = px @ rgb / (norm * np.linalg.norm(rgb))
    return float(np.mean((cos > 0.97) & (norm > 0.15 * np.linalg.norm(rgb))))


def test_object_of_the_class_colour_fills_its_box_and_dominates_the_image():
    d = generate(SyntheticSpec(num_classes=6, image_size=96, train_per_class=10,
                               test_per_class=1))
    for img, y, (y0, y1, x0, x1) in zip(d.train_x, d.train_y, d.train_boxes):
        rgb = np.array(COLOURS[class_attributes(int(y))[2]], dtype=np.float64)
        inside = _class_colour_fraction(img[y0:y1, x0:x1], rgb)
        outside_img = img.copy()
        outside_img[y0:y1, x0:x1] = 128
        outside = _class_colour_fraction(outside_img, rgb)
        assert inside > 0.25, (y, inside)
        # In pixel counts, the object carries far more of its colour than the clutter does.
        box_px = (y1 - y0) * (x1 - x0)
        assert inside * box_px > 2 * outside * img.shape[0] * img.shape[1], (y, inside, outside)


def test_distractors_are_smaller_than_the_smallest_object():
    size = 96
    rng = np.random.Generator(np.random.PCG64(123))
    smallest_object = np.ceil(synthetic.OBJECT_SIDE_RANGE[0] * size)
    for _ in range(300):
        canvas = np.full((size, size, 3), np.nan)
        synthetic._draw_distractors(rng, canvas)
        drawn = ~np.isnan(canvas[..., 0])
        # Label each distractor by its colour (blobs/strokes may overlap; colours rarely repeat
        # exactly since each gets its own brightness factor).
        colours = np.unique(canvas[drawn], axis=0)
        assert len(colours) >= 1
        for c in colours:
            ys, xs = np.nonzero((canvas == c).all(axis=2))
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert extent <= synthetic.DISTRACTOR_MAX_EXTENT * size + 2
            assert extent < 0.6 * smallest_object


def test_generation_speed():
    start = time.perf_counter()
    generate(SyntheticSpec(num_classes=10, image_size=96, train_per_class=12, test_per_class=4))
    # 160 images; the default 10 x 80 takes ~5x this.
    assert time.perf_counter() - start < 4.0  # ~0.3 s; per-pixel Python loops take minutes


# ------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("field, value", [
    ("num_classes", 0), ("num_classes", 1000), ("num_classes", 2.0),
    ("image_size", 31), ("image_size", 257), ("image_size", True),
    ("train_per_class", 0), ("test_per_class", 0), ("test_per_class", "5"),
    ("seed", -1),
])
def test_validation_names_the_field(field, value):
    spec = SyntheticSpec(**{field: value})
    with pytest.raises(ValueError, match=field):
        spec.validate()
    with pytest.raises(ValueError, match=field):
        generate(spec)
    with pytest.raises(ValueError, match=field):
        spec.cache_key()


def test_too_many_classes_names_the_maximum():
    with pytest.raises(ValueError, match=rf"num_classes=193.*{max_classes()}"):
        SyntheticSpec(num_classes=max_classes() + 1).validate()
    SyntheticSpec(num_classes=max_classes(), image_size=32).validate()


def test_cache_key_is_stable_and_distinguishes_specs():
    assert SMALL.cache_key() == SyntheticSpec(**SMALL.__dict__).cache_key()
    assert f"v{synthetic.FORMAT_VERSION}" in SMALL.cache_key()
    keys = {SyntheticSpec(**{**SMALL.__dict__, f: getattr(SMALL, f) + 1}).cache_key()
            for f in ("num_classes", "image_size", "train_per_class", "test_per_class", "seed")}
    assert len(keys | {SMALL.cache_key()}) == 6


# ------------------------------------------------------------------------------------------------
# Cache


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CIM_PLUGIN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CIM_PLUGIN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "cim-plugin"


def test_cache_roundtrip_reads_the_file(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger=synthetic.__name__):
        first = load_synthetic(SMALL, tmp_path)
    path = tmp_path / "synthetic" / f"{SMALL.cache_key()}.npz"
    assert path.is_file()
    assert str(path) in caplog.text and "generat" in caplog.text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over
    assert_data_equal(first, generate(SMALL))

    def fail(spec):
        raise AssertionError("generate must not be called when the cache is valid")

    monkeypatch.setattr(synthetic, "generate", fail)
    second = load_synthetic(SMALL, tmp_path)
    assert_data_equal(first, second)


def test_cache_uses_env_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CIM_PLUGIN_CACHE", str(tmp_path))
    load_synthetic(SMALL)
    assert (tmp_path / "synthetic" / f"{SMALL.cache_key()}.npz").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_arrays"])
def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path, caplog, damage):
    good = load_synthetic(SMALL, tmp_path)
    path = tmp_path / "synthetic" / f"{SMALL.cache_key()}.npz"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:  # a readable npz with the right keys but the shapes of another spec
        other = generate(SyntheticSpec(num_classes=2, image_size=32, train_per_class=1,
                                       test_per_class=1))
        with open(path, "wb") as f:
            np.savez(f, **{k: getattr(other, k) for k in FIELDS},
                     class_names=np.array(other.class_names), cache_key=np.array(SMALL.cache_key()))
    with caplog.at_level(logging.WARNING, logger=synthetic.__name__):
        again = load_synthetic(SMALL, tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert_data_equal(good, again)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=synthetic.__name__):
        assert_data_equal(good, load_synthetic(SMALL, tmp_path))  # the file was rewritten
    assert not caplog.records


# ------------------------------------------------------------------------------------------------
# A CAM must be able to find the object


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, 12), nn.MaxPool2d(2),
            *block(12, 24), nn.MaxPool2d(2),
            *block(24, 48), *block(48, 48),
        )
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        fmap = self.features(x)
        return self.fc(fmap.mean(dim=(2, 3))), fmap


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.25)


def test_cam_of_a_tiny_cnn_finds_the_object():
    size = 64
    d = generate(SyntheticSpec(num_classes=4, image_size=size, train_per_class=60,
                               test_per_class=20, seed=0))
    threads = torch.get_num_threads()
    # One thread: tiny convolutions gain little from more, and OpenMP threads spin badly when the
    # machine is shared (measured: 1 s single-threaded vs 10-40 s with 2 threads under load).
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = TinyCNN(4)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = _to_tensor(d.train_x), torch.from_numpy(d.train_y)
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            model.train()
            for idx in torch.randperm(len(x), generator=g).split(32):
                loss = F.cross_entropy(model(x[idx])[0], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            train_acc = (model(x)[0].argmax(1) == y).float().mean().item()
            xt, yt = _to_tensor(d.test_x), torch.from_numpy(d.test_y)
            logits, fmap = model(xt)
    finally:
        torch.set_num_threads(threads)

    with torch.no_grad():
        test_acc = (logits.argmax(1) == yt).float().mean().item()
        cam = torch.einsum("nchw,nc->nhw", fmap, model.fc.weight[yt])
        lo = cam.flatten(1).min(1).values[:, None, None]
        hi = cam.flatten(1).max(1).values[:, None, None]
        cam = (cam - lo) / (hi - lo + 1e-8)
        cam = F.interpolate(cam[:, None], size=(size, size), mode="bilinear",
                            align_corners=False)[:, 0]
    peak = cam.flatten(1).argmax(1).numpy()
    py, px = peak // size, peak % size
    y0, y1, x0, x1 = d.test_boxes.T
    hit_rate = float(np.mean((py >= y0) & (py < y1) & (px >= x0) & (px < x1)))
    box_area = float(np.mean((y1 - y0) * (x1 - x0) / size**2))
    print(f"train acc {train_acc:.2f} test acc {test_acc:.2f} CAM hit rate {hit_rate:.2f} "
          f"(mean box area {box_area:.3f})")
    assert train_acc > 0.8, train_acc
    assert test_acc > 0.5, test_acc
    assert hit_rate > max(0.3, 2 * box_area), (hit_rate, box_area)


# ------------------------------------------------------------------------------------------------
# Colour mode "random": the class is a (shape, texture) pair, the colour is drawn per image

RANDOM = SyntheticSpec(num_classes=4, image_size=64, train_per_class=12, test_per_class=2,
                       colour="random")


def test_random_colour_classes_are_shape_texture_pairs():
    pairs = [class_attributes(k, "random") for k in range(max_classes("random"))]
    assert max_classes("random") == len(SHAPES) * len(TEXTURES)
    assert len(set(pairs)) == max_classes("random") and all(c is None for *_, c in pairs)
    # The first four classes differ in shape and in texture.
    assert len({p[0] for p in pairs[:4]}) == 4 and len({p[1] for p in pairs[:4]}) == 4
    assert class_name(1, "random") == "striped-square"
    with pytest.raises(ValueError, match="32"):
        SyntheticSpec(num_classes=33, colour="random").validate()
    with pytest.raises(ValueError, match="colour='grey'"):
        SyntheticSpec(colour="grey").validate()


def test_random_colour_paints_each_class_in_several_colours():
    d = generate(RANDOM)
    assert d.class_names == [class_name(k, "random") for k in range(4)]
    for k in range(4):
        seen = set()
        for img, (y0, y1, x0, x1) in zip(d.train_x[d.train_y == k], d.train_boxes[d.train_y == k]):
            shares = [_class_colour_fraction(img[y0:y1, x0:x1], np.array(rgb, dtype=np.float64))
                      for rgb in COLOURS.values()]
            seen.add(int(np.argmax(shares)))
        assert len(seen) >= 3, (k, seen)  # 12 images: one colour would mean a colour-coded class


def test_random_colour_mode_has_its_own_cache_key_and_leaves_class_mode_alone():
    assert RANDOM.cache_key() != SyntheticSpec(**{**RANDOM.__dict__, "colour": "class"}).cache_key()
    assert "random" in RANDOM.cache_key() and "random" not in SMALL.cache_key()
    # Same streams, the colour drawn after the object's geometry: each class's first image has
    # the class mode's box (later ones shift by that one draw). The class mode's own pixels are
    # pinned by test_generate_golden_digest.
    plain = generate(SyntheticSpec(**{**RANDOM.__dict__, "colour": "class"}))
    rand = generate(RANDOM)
    np.testing.assert_array_equal(plain.train_boxes[::12], rand.train_boxes[::12])
    assert not np.array_equal(plain.train_boxes, rand.train_boxes)
