import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cim_plugin.core.boxes import align_boxes
from cim_plugin.core.codec import blend_compress
from cim_plugin.core.memory import CompressedExemplarMemory, ExemplarMemory

H, W = 24, 20


def _images(n, seed=0, shape=(H, W, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _boxes(n, seed=0, s=2, size=(H, W)):
    g = np.random.default_rng(seed)
    y0 = g.integers(0, size[0], n); y1 = np.minimum(size[0], y0 + g.integers(1, size[0], n))
    x0 = g.integers(0, size[1], n); x1 = np.minimum(size[1], x0 + g.integers(1, size[1], n))
    b = torch.as_tensor(np.stack([y0, y1, x0, x1], 1), dtype=torch.int64)
    return align_boxes(b, size, s).numpy()


def test_plain_memory_holds_exact_pixels_one_unit_each():
    mem = ExemplarMemory((H, W, 3))
    imgs = _images(7)
    assert mem.add_class(3, imgs, budget=5) == 5
    assert mem.units_used() == 5 and mem.bytes_used() == 5 * H * W * 3
    np.testing.assert_array_equal(mem.images(3), imgs[:5])
    assert mem.targets().tolist() == [3] * 5


def test_compressed_memory_replays_what_blend_produces_and_costs_match_bytes():
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    imgs, boxes = _images(9, 1), _boxes(9, 1)
    kept = mem.add_class(0, imgs, boxes, budget=None)
    assert kept == 9
    expected = blend_compress(torch.from_numpy(imgs).permute(0, 3, 1, 2), torch.as_tensor(boxes), 2)
    np.testing.assert_array_equal(mem.images(0), expected.permute(0, 2, 3, 1).numpy())
    assert mem.bytes_used() == pytest.approx(mem.units_used() * H * W * 3)
    # box pixels are bit-identical to the original
    y0, y1, x0, x1 = boxes[0]
    np.testing.assert_array_equal(mem.images(0, [0])[0, y0:y1, x0:x1], imgs[0, y0:y1, x0:x1])


def test_compressed_memory_holds_more_exemplars_for_the_same_budget():
    plain, comp = ExemplarMemory((H, W, 3)), CompressedExemplarMemory((H, W, 3), 4.0)
    imgs = _images(40, 2)
    small = np.tile(np.array([[4, 12, 4, 12]]), (40, 1))  # 64 of 480 pixels at full resolution
    plain.add_class(0, imgs, budget=10)
    comp.add_class(0, imgs, small, budget=10)
    assert comp.count(0) > 2.5 * plain.count(0)
    assert comp.bytes_used() <= 10 * H * W * 3


def test_dataset_yields_pycil_style_samples():
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    mem.add_class(2, _images(3), _boxes(3)); mem.add_class(0, _images(2, 5), _boxes(2, 5))
    ds = mem.as_dataset(lambda img: torch.as_tensor(np.asarray(img)))
    assert len(ds) == 5
    labels = [ds[i][2] for i in range(5)]
    assert labels == [0, 0, 2, 2, 2]
    idx, img, _ = ds[3]
    assert idx == 3 and torch.equal(img, torch.as_tensor(mem.images(2, [1])[0]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=5),  # new classes per phase
    st.integers(4, 40),  # memory_size
    st.booleans(),  # fixed memory
    st.integers(0, 10_000),
)
def test_no_sequence_of_phases_exceeds_the_budget(increments, memory_size, fixed, seed):
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    known, previous = 0, {}
    for phase, inc in enumerate(increments):
        total = known + inc
        per_class = 3 if fixed else memory_size // total
        if not fixed:
            mem.reduce(per_class)
        for c in range(known, total):
            n = 12
            mem.add_class(c, _images(n, seed + c), _boxes(n, seed + c), budget=per_class)
        for c in mem.labels:
            assert mem.units_used(c) <= per_class + 1e-9
            # shrinking keeps a prefix of the earlier ranking
            if c in previous:
                before = previous[c]
                assert np.array_equal(mem.boxes(c), before[: mem.count(c)])
        assert mem.units_used() <= per_class * total + 1e-9
        assert mem.bytes_used() <= per_class * total * H * W * 3
        previous = {c: mem.boxes(c) for c in mem.labels}
        known = total


def test_save_load_roundtrip_and_refusals(tmp_path):
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    mem.add_class(1, _images(4), _boxes(4))
    path = mem.save(tmp_path / "mem.npz")
    back = CompressedExemplarMemory((H, W, 3), 4.0)
    back.load(path)
    np.testing.assert_array_equal(back.images(1), mem.images(1))
    other = CompressedExemplarMemory((H, W, 3), 16.0)
    with pytest.raises(ValueError, match="compress_ratio"):
        other.load(path)
    resized = CompressedExemplarMemory((H * 2, W, 3), 4.0)
    with pytest.raises(ValueError, match="image_shape"):
        resized.load(path)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        back.load(tmp_path / "cut.npz")
    np.testing.assert_array_equal(back.images(1), mem.images(1))  # a failed load leaves it intact


def test_a_state_whose_items_disagree_with_their_boxes_is_refused_on_loading():
    """Reads during replay skip the per-item checks, so loading checks every item once: offsets
    shifted between two items (the total unchanged) or a plain item of the wrong size are refused,
    and the memory keeps what it held."""
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    mem.add_class(1, _images(4), _boxes(4))
    state = mem.state_dict()
    state["classes"][1]["offsets"][1] += 3  # item 0 three bytes longer, item 1 three shorter
    back = CompressedExemplarMemory((H, W, 3), 4.0)
    back.add_class(2, _images(2, 7), _boxes(2, 7))
    with pytest.raises(ValueError, match="class 1 is inconsistent.*item 0 has"):
        back.load_state_dict(state)
    assert back.labels == [2] and len(back.images(2)) == 2
    plain = ExemplarMemory((H, W, 3))
    plain.add_class(0, _images(3))
    pstate = plain.state_dict()
    pstate["classes"][0]["offsets"][1] -= 1
    with pytest.raises(ValueError, match="class 0 is inconsistent"):
        ExemplarMemory((H, W, 3)).load_state_dict(pstate)


def test_exemplar_indices_out_of_range_are_refused_not_wrapped():
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    mem.add_class(0, _images(3), _boxes(3))
    np.testing.assert_array_equal(mem.images(0, [2]), mem.images(0)[2:3])
    for bad in ([-1], [3], [0, 5]):
        with pytest.raises(IndexError, match=r"\[0, 3\)"):
            mem.images(0, bad)


def test_wrong_images_are_refused_with_shape_in_message():
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    with pytest.raises(ValueError, match="uint8"):
        mem.add_class(0, _images(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        mem.add_class(0, _images(2), np.zeros((3, 4), dtype=np.int64))


def test_an_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    mem = CompressedExemplarMemory((H, W, 3), 4.0)
    mem.add_class(1, _images(4), _boxes(4))
    path = mem.save(tmp_path / "mem.npz")
    before = path.read_bytes()
    mem.add_class(2, _images(3, 9), _boxes(3, 9))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        mem.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mem.npz"]  # no temporary file left behind
