"""Bad images in path datasets: every mode converted, unreadable files skipped with a warning."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cim_plugin.config import CIMConfig
from cim_plugin.core.augmentation import ArtefactAugmentation
from cim_plugin.core.memory import CompressedExemplarMemory
from cim_plugin.pycil import data as D
from cim_plugin.pycil.data import (
    ArtefactAugmentedDataset, RobustPathDataset, check_image, drop_unreadable,
    load_path_image, scan_images, storage_crop, to_storage,
)
from cim_plugin.pycil.learner import CIMLearnerMixin

from fakes import FakeBaseLearner

S = 16  # storage side used throughout (small: the tests stay cheap)


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """{name: path} of good files of every awkward kind, and of bad ones."""
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 10:, 3] = 255  # left half fully transparent, right half opaque red
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpg = save(Image.fromarray(noise), tmp_path / "full.jpg", quality=90)
    raw = open(jpg, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.jpg").write_text("not an image at all\n")
    (tmp_path / "empty.png").write_bytes(b"")
    return {
        "gray": save(Image.new("L", (30, 20), 100), tmp_path / "gray.png"),
        "rgba": save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"),
        "la": save(Image.new("LA", (20, 20), (90, 255)), tmp_path / "la.png"),
        "palette": save(pal, tmp_path / "palette.png"),
        "palette_t": save(pal_t, tmp_path / "palette_t.png"),
        "i16_white": save(Image.fromarray(np.full((20, 20), 65535, np.uint16)), tmp_path / "white16.png"),
        "i16_mid": save(Image.fromarray(np.full((20, 20), 32896, np.uint16)), tmp_path / "mid16.png"),
        "i16_dark": save(Image.fromarray(np.full((20, 20), 1000, np.uint16)), tmp_path / "dark16.tif"),
        "cmyk": save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100),
        "bilevel": save(Image.new("1", (20, 20), 1), tmp_path / "bilevel.png"),
        "one": save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "one.png"),
        "tall": save(Image.new("RGB", (3, 900), (40, 50, 60)), tmp_path / "tall.png"),
        "wide": save(Image.new("RGB", (900, 1), (70, 80, 90)), tmp_path / "wide.png"),
        "jpeg": jpg,
        "truncated": str(tmp_path / "truncated.jpg"),
        "text": str(tmp_path / "text.jpg"),
        "empty": str(tmp_path / "empty.png"),
        "missing": str(tmp_path / "missing.png"),
    }


BAD = ("truncated", "text", "empty", "missing")
EXPECTED = {  # a pixel of the centre crop (or the whole image when it is uniform)
    "gray": (100, 100, 100),
    "la": (90, 90, 90),
    "palette": (10, 200, 30),
    "palette_t": (0, 0, 0),  # the transparent index, composited on black
    "i16_white": (255, 255, 255),
    "i16_mid": (128, 128, 128),
    "i16_dark": (4, 4, 4),  # 1000 / 257, not clipped to 255
    "bilevel": (255, 255, 255),
    "one": (10, 20, 30),
    "tall": (40, 50, 60),
    "wide": (70, 80, 90),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_mode_gives_rgb_uint8_storage_image(files, name):
    img, aspect = load_path_image(files[name], S)
    assert img.shape == (S, S, 3) and img.dtype == np.uint8 and 1 / 4 <= aspect <= 4
    assert np.all(np.abs(img.astype(int) - EXPECTED[name]) <= 1), img[S // 2, S // 2]


def test_alpha_is_composited_on_black(files):
    with Image.open(files["rgba"]) as im:
        img = D.to_rgb(im)
    a = np.asarray(img)
    assert img.mode == "RGB"
    assert (a[:, :10] == 0).all()  # transparent red -> background
    assert (a[:, 10:] == (200, 0, 0)).all()


def test_cmyk_is_converted(files):
    img, _ = load_path_image(files["cmyk"], S)
    r, g, b = img[S // 2, S // 2].astype(int)
    assert r > 240 and g < 15 and b < 15  # C=0, M=Y=255: red


def test_storage_geometry_matches_pycil_test_transform():
    from torchvision import transforms

    y, x = np.mgrid[0:48, 0:64]
    src = Image.fromarray(np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8))
    short = round(S * 256 / 224)
    ref = np.asarray(transforms.Compose([transforms.Resize(short), transforms.CenterCrop(S)])(src)).astype(int)
    ours = storage_crop(src, S).astype(int)
    assert np.abs(ours - ref).mean() < 3.0  # same view up to sub-pixel rounding
    np.testing.assert_array_equal(load_path_image_crop(src, S), storage_crop(src, S))


def load_path_image_crop(src, size, tmp=None):
    """``load_path_image`` with the crop view, through a real file."""
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.png")
        src.save(path)
        img, aspect = load_path_image(path, size, "crop")
    assert aspect == 1.0
    return img


def test_the_whole_view_keeps_the_field_of_view_that_replay_sees():
    """A 4:3 image with a marker at its left edge: the crop view loses the marker, the whole view
    keeps it, and replay rebuilds the image at its aspect (shorter side S)."""
    from cim_plugin.core.memory import ExemplarMemory, restore_view

    src = np.full((60, 80, 3), 90, dtype=np.uint8)
    src[:, :6] = (250, 0, 0)  # a red strip at the left edge
    pil = Image.fromarray(src)
    crop = storage_crop(pil, S)
    whole, aspect = D.storage_whole(pil, S)
    assert aspect == pytest.approx(80 / 60)
    assert (crop[:, :, 0] < 200).all() and (whole[:, 0, 0] > 200).all()
    back = np.asarray(restore_view(whole, aspect))
    assert back.shape == (S, round(S * 80 / 60), 3)
    ref = np.asarray(pil.resize((back.shape[1], S), Image.BILINEAR)).astype(int)
    assert np.abs(back.astype(int) - ref).mean() < 4.0  # the file's view at shorter side S
    mem = ExemplarMemory((S, S, 3))
    mem.add_class(0, whole[None], aspects=np.array([aspect]))
    _, replayed, _ = mem.as_dataset(lambda im: np.asarray(im)).__getitem__(0)
    np.testing.assert_array_equal(replayed, back)  # the memory replays the rebuilt view
    assert mem.as_dataset()[0][1].shape == (S, S, 3)  # without a transform: as stored


def test_views_wider_than_four_to_one_are_cropped_to_it():
    wide = Image.fromarray(np.zeros((10, 100, 3), dtype=np.uint8))
    assert D.storage_whole(wide, S)[1] == pytest.approx(4.0)
    assert D.storage_whole(wide.transpose(Image.TRANSPOSE), S)[1] == pytest.approx(0.25)


def test_to_storage_skips_bad_files_with_a_warning(files, caplog):
    names = sorted(files)
    with caplog.at_level(logging.WARNING, logger="cim_plugin.pycil.data"):
        images, ok = to_storage([files[n] for n in names], True, S)
    assert images.shape == (len(names), S, S, 3) and images.dtype == np.uint8
    assert ok.dtype == bool and ok.tolist() == [n not in BAD for n in names]
    assert not images[~ok].any()
    for n in BAD:
        assert sum(files[n] in r.getMessage() for r in caplog.records) == 1, n
    assert any(f"{len(BAD)} of {len(names)} images could not be read" in r.getMessage() for r in caplog.records)
    # a second call does not repeat the per-file warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cim_plugin.pycil.data"):
        to_storage([files["text"]], True, S)
    assert not caplog.records


def test_to_storage_of_arrays_is_all_ok():
    arr = np.zeros((3, 8, 8, 3), np.uint8)
    images, ok = to_storage(arr, False, 99)
    assert images.shape == (3, 8, 8, 3) and ok.all()


def test_check_image_and_scan(files):
    for n, p in files.items():
        assert (check_image(p) is None) == (n not in BAD), n
    bad = scan_images(list(files.values()), workers=2)
    assert set(bad) == {files[n] for n in BAD}
    kept = drop_unreadable([(p, i % 2) for i, p in enumerate(files.values())], "train")  # no class left empty
    assert [p for p, _ in kept] == [files[n] for n in files if n not in BAD]


class Grey:
    """A transform that records the image it got."""

    def __call__(self, img):
        return np.asarray(img)


def test_robust_dataset_substitutes_a_readable_image_of_the_class(files, caplog):
    paths = np.array([files["gray"], files["text"], files["one"], files["missing"], files["truncated"]])
    labels = np.array([0, 0, 1, 2, 2])

    class Dummy:  # PyCIL's DummyDataset, as far as the wrapper reads it
        images, trsf, use_path = paths, Grey(), True

    Dummy.labels = labels
    ds = RobustPathDataset(Dummy())
    with caplog.at_level(logging.WARNING, logger="cim_plugin.pycil.data"):
        idx, img, label = ds[1]
        assert (idx, label) == (1, 0) and (img == 100).all()  # the class's readable "gray"
        _, img, label = ds[3]  # class 2 has no readable image at all
    assert label == 2 and img.shape == (256, 256, 3) and (img == 128).all()
    assert any(files["text"] in r.getMessage() for r in caplog.records)
    assert any("no readable image of class 2" in r.getMessage() for r in caplog.records)
    assert len(ds) == 5 and ds[2][2] == 1


def test_augmented_dataset_falls_back_to_pycils_item(files):
    paths = np.array([files["text"], files["gray"]])

    class Base:
        images, labels, trsf, use_path = paths, np.array([0, 0]), Grey(), True

        def __getitem__(self, idx):
            return idx, "pycil's own", self.labels[idx]

        def __len__(self):
            return 2

    state = ArtefactAugmentation(2, 1, 0.1)
    state.share, state.boxes = 1.0, np.array([[0, 8, 0, 8], [0, 8, 0, 8]])
    ds = ArtefactAugmentedDataset(Base(), state, S)
    assert ds[0] == (0, "pycil's own", 0)
    _, img, _ = ds[1]
    assert min(img.shape[:2]) == S and img.shape[2] == 3  # the whole view, rebuilt at shorter side S


# -- the learner: unreadable files are left out of the candidates / keep the full box ----------


class Learner(CIMLearnerMixin, FakeBaseLearner):
    pass


def learner(mask="cam", **keys):
    torch.manual_seed(0)
    lrn = Learner()
    lrn.cim_setup(CIMConfig.from_args({"cim": True, "model_name": "icarl", "cim_mask": mask, "cim_storage_size": S, **keys}))
    lrn.cim.use_memory(CompressedExemplarMemory((S, S, 3), 4.0))
    return lrn


def test_fill_class_leaves_unreadable_files_out(files, caplog):
    paths = [files["gray"], files["text"], files["one"], files["truncated"], files["tall"]]

    class DM:
        use_path = True

        def class_items(self, label):
            return paths, np.arange(len(paths))

        def object_boxes(self, positions):  # folders do not know where their objects are
            return None

    lrn = learner()
    with caplog.at_level(logging.WARNING):
        lrn.cim.fill_class(DM(), 1, 10.0)
    assert len(lrn.cim.memory) == 3  # the three readable files, a budget of 10 units holds them
    assert any("class 1: 2 of 5 images unreadable" in r.getMessage() for r in caplog.records)

    paths[:] = [files["text"], files["missing"]]
    assert lrn.cim.fill_class(DM(), 2, 10.0) == 0 and 2 not in lrn.cim.memory


def test_refresh_boxes_gives_unreadable_items_the_full_box(files):
    lrn = learner(cam_batch_size=2)

    class Items:
        images = np.array([files["gray"], files["text"], files["jpeg"]])
        labels = np.array([0, 0, 1])
        use_path = True

    lrn.cim.train_set = Items()
    lrn.cim.refresh_boxes(1)
    boxes = lrn.cim.augmentation.boxes
    assert boxes.shape == (3, 4) and boxes[1].tolist() == [0, S, 0, S]


def test_plugin_data_manager_reads_paths_through_the_robust_dataset(files):
    from cim_plugin.pycil.data import PluginDataManager

    paths, labels = np.array([files["gray"], files["text"]]), np.array([0, 0])

    class Dummy:
        images, trsf, use_path = paths, Grey(), True

    Dummy.labels = labels

    class DM:
        use_path = True

        def get_dataset(self, indices, source, mode, appendent=None, ret_data=False, m_rate=None):
            return (paths, labels, Dummy()) if ret_data else Dummy()

    lrn = learner()
    dm = PluginDataManager(DM(), lrn.cim.augmentation, S, new_classes=[0])
    test = dm.get_dataset([0], "test", "test")
    assert isinstance(test, RobustPathDataset) and (test[1][1] == 100).all()
    _, _, train = dm.get_dataset([0], "train", "train", ret_data=True)
    assert isinstance(train, ArtefactAugmentedDataset) and isinstance(train.base, RobustPathDataset)
    assert (train[1][1] == 100).all()
