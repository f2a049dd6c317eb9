"""Core diagnostics: box recall, reconstruction PSNR, the recall / area curve, the oracle source."""

import math

import pytest
import torch

from cim_plugin.core.boxes import is_aligned
from cim_plugin.core.diagnostics import box_recall, image_mse, psnr_db, recall_area_curve
from cim_plugin.core.masks import make_mask_source


def test_box_recall_counts_the_object_share_inside_the_box():
    truth = torch.tensor([[10, 20, 10, 20], [10, 20, 10, 20], [10, 20, 10, 20], [0, 0, 0, 0]])
    boxes = torch.tensor([[0, 32, 0, 32], [15, 20, 10, 20], [20, 30, 20, 30], [0, 8, 0, 8]])
    assert box_recall(boxes, truth).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_box_recall_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        box_recall(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64))


def test_psnr_of_known_error_and_identical_images():
    a = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # every value off by 10: mse 100
    mse = image_mse(a, b)
    assert mse.tolist() == [100.0, 0.0]
    assert psnr_db(mse[0]) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr_db(0.0) is None


def test_recall_area_curve_is_monotone_in_tau_and_exact_for_a_peaked_cam():
    # a CAM that peaks on the object (rows/cols 2..3 of an 8x8 map = pixels 8..16 of 32)
    cam = torch.zeros(1, 8, 8)
    cam[0, 2:4, 2:4] = 1.0
    truth = torch.tensor([[8, 16, 8, 16]])
    rows = recall_area_curve(cam, truth, (32, 32), factor=2, taus=(0.1, 0.5, 0.9))
    areas = [r["mean_box_area"] for r in rows]
    assert areas == sorted(areas, reverse=True)
    # at τ 0.5 the bilinear CAM's box is the object exactly; higher τ cuts into the object
    assert rows[1]["mean_box_area"] == pytest.approx(64 / 1024) and rows[1]["mean_recall"] == 1.0
    assert rows[0]["mean_recall"] == 1.0 and rows[2]["mean_recall"] < 1.0
    assert [r["tau"] for r in rows] == [0.1, 0.5, 0.9]


def test_oracle_source_returns_the_aligned_true_box():
    src = make_mask_source("oracle", factor=4, threshold=0.6)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    truth = torch.tensor([[5, 13, 6, 30], [0, 32, 0, 32]])
    res = src.boxes(images, torch.tensor([0, 1]), None, truth=truth)
    assert res.boxes.tolist() == [[4, 16, 4, 32], [0, 32, 0, 32]]
    assert bool(is_aligned(res.boxes, (32, 32), 4).all())
    assert not res.fallback.any()
    assert box_recall(res.boxes, truth).tolist() == [1.0, 1.0]


def test_oracle_source_without_truth_names_the_problem():
    src = make_mask_source("oracle", factor=2, threshold=0.6)
    with pytest.raises(ValueError, match="true object boxes"):
        src.boxes(torch.zeros(1, 3, 8, 8), torch.tensor([0]), None)
