"""Tests for cim_plugin.core.cam: raw CAMs, min-max normalisation, bilinear upsampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cim_plugin.core.cam import class_activation_maps, normalize_cams, upsample_cams


def _reference_cam(fmap: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    batch, channels, h, w = fmap.shape
    out = torch.zeros(batch, h, w, dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            out[b] += float(weight[labels[b], c]) * fmap[b, c].double()
    return out


# --------------------------------------------------------------------------------------------
# class_activation_maps
# --------------------------------------------------------------------------------------------


def test_cam_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(5, 6, 4, 3, generator=g)
    weight = torch.randn(7, 6, generator=g)
    labels = torch.tensor([0, 6, 3, 3, 1])
    cam = class_activation_maps(fmap, weight, labels)
    assert cam.shape == (5, 4, 3)
    torch.testing.assert_close(cam.double(), _reference_cam(fmap, weight, labels), rtol=1e-5, atol=1e-5)


def test_cam_uses_the_label_row_only():
    fmap = torch.ones(2, 3, 2, 2)
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 3.0]])
    cam = class_activation_maps(fmap, weight, torch.tensor([1, 0]))
    assert torch.all(cam[0] == 5.0)
    assert torch.all(cam[1] == 1.0)


def test_cam_batch_equals_stacked_singles():
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(4, 5, 3, 6, generator=g)
    weight = torch.randn(3, 5, generator=g)
    labels = torch.tensor([2, 0, 1, 2])
    batched = class_activation_maps(fmap, weight, labels)
    singles = torch.cat([class_activation_maps(fmap[i : i + 1], weight, labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles)


def test_cam_gradients_flow_to_fmap_and_weight():
    g = torch.Generator().manual_seed(2)
    fmap = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.tensor([1, 4, 1])
    cam = class_activation_maps(fmap, weight, labels)
    (cam**2).sum().backward()
    assert fmap.grad is not None and weight.grad is not None
    assert fmap.grad.abs().sum() > 0
    assert weight.grad[1].abs().sum() > 0 and weight.grad[4].abs().sum() > 0
    # rows of classes not present get no gradient
    for k in (0, 2, 3, 5):
        assert torch.all(weight.grad[k] == 0)


@pytest.mark.parametrize(
    "fmap_shape, weight_shape, labels, match",
    [
        ((2, 3, 4, 4), (5, 4), [0, 1], "channel"),
        ((2, 3, 4, 4), (5, 3), [0, 1, 2], "batch"),
        ((2, 3, 4), (5, 3), [0, 1], "fmap"),
        ((2, 3, 4, 4), (5, 3, 1), [0, 1], "weight"),
        ((2, 3, 4, 4), (5, 3), [0, 5], "labels"),
        ((2, 3, 4, 4), (5, 3), [-1, 0], "labels"),
    ],
)
def test_cam_shape_errors(fmap_shape, weight_shape, labels, match):
    with pytest.raises(ValueError, match=match):
        class_activation_maps(torch.zeros(fmap_shape), torch.zeros(weight_shape), torch.tensor(labels))


def test_cam_rejects_float_labels():
    with pytest.raises(ValueError, match="labels"):
        class_activation_maps(torch.zeros(2, 3, 4, 4), torch.zeros(5, 3), torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------
# normalize_cams
# --------------------------------------------------------------------------------------------


def test_normalize_min_max_per_map():
    g = torch.Generator().manual_seed(3)
    cam = torch.randn(6, 7, 7, generator=g) * torch.arange(1, 7).view(6, 1, 1) + 10
    norm, degenerate = normalize_cams(cam)
    assert not degenerate.any()
    assert torch.allclose(norm.amin(dim=(1, 2)), torch.zeros(6))
    assert torch.allclose(norm.amax(dim=(1, 2)), torch.ones(6))
    assert norm.min() >= 0 and norm.max() <= 1
    # order preserved within each map
    i, j = cam.flatten(1).argmax(1), cam.flatten(1).argmin(1)
    assert torch.equal(norm.flatten(1).argmax(1), i) and torch.equal(norm.flatten(1).argmin(1), j)


def test_normalize_degenerate_maps_are_zero_not_nan():
    good = torch.arange(9.0).view(3, 3)
    const = torch.full((3, 3), 4.2)
    nan = good.clone()
    nan[1, 1] = float("nan")
    inf = good.clone()
    inf[0, 2] = float("inf")
    tiny = good * 1e-12  # span below eps
    cam = torch.stack([good, const, nan, inf, tiny])
    norm, degenerate = normalize_cams(cam)
    assert degenerate.tolist() == [False, True, True, True, True]
    assert torch.isfinite(norm).all()
    assert torch.all(norm[1:] == 0)
    torch.testing.assert_close(norm[0], good / 8.0)


def test_normalize_eps_controls_constancy():
    cam = torch.tensor([[[0.0, 1e-3]]])
    assert not normalize_cams(cam, eps=1e-8)[1].item()
    assert normalize_cams(cam, eps=1e-2)[1].item()
    with pytest.raises(ValueError, match="eps"):
        normalize_cams(cam, eps=-1.0)


def test_normalize_gradient_flows_and_stays_finite():
    g = torch.Generator().manual_seed(4)
    good = torch.randn(2, 4, 4, generator=g)
    bad = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), float("nan"))])
    cam = torch.cat([good, bad]).requires_grad_(True)
    norm, degenerate = normalize_cams(cam)
    weights = torch.randn(4, 4, 4, generator=g)
    (norm * weights).sum().backward()
    assert degenerate.tolist() == [False, False, True, True]
    assert torch.isfinite(cam.grad).all()
    assert cam.grad[:2].abs().sum() > 0
    assert torch.all(cam.grad[2:] == 0)


def test_normalize_batch_equals_stacked_singles():
    g = torch.Generator().manual_seed(5)
    cam = torch.randn(5, 3, 4, generator=g)
    cam[2] = 7.0
    norm, deg = normalize_cams(cam)
    singles = [normalize_cams(cam[i : i + 1]) for i in range(5)]
    torch.testing.assert_close(norm, torch.cat([n for n, _ in singles]))
    assert torch.equal(deg, torch.cat([d for _, d in singles]))


def test_normalize_integer_cam_and_shape_error():
    norm, deg = normalize_cams(torch.tensor([[[0, 2], [4, 8]]]))
    assert norm.dtype.is_floating_point and not deg.any()
    torch.testing.assert_close(norm[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    with pytest.raises(ValueError, match="cam"):
        normalize_cams(torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------
# upsample_cams
# --------------------------------------------------------------------------------------------


def test_upsample_matches_interpolate_and_keeps_constants():
    g = torch.Generator().manual_seed(6)
    cam = torch.rand(3, 4, 5, generator=g)
    up = upsample_cams(cam, (13, 9))
    assert up.shape == (3, 13, 9)
    ref = F.interpolate(cam[:, None], size=(13, 9), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ref)
    const = upsample_cams(torch.full((1, 3, 3), 0.25), (10, 7))
    assert torch.allclose(const, torch.full_like(const, 0.25))
    # bilinear stays within the input range
    assert up.min() >= cam.min() - 1e-6 and up.max() <= cam.max() + 1e-6


def test_upsample_integer_factor_centres():
    """With align_corners=False an integer upscale by 2 gives 0.75/0.25 mixes between neighbours."""
    cam = torch.tensor([[[0.0, 1.0]]])
    up = upsample_cams(cam, (1, 4))
    torch.testing.assert_close(up[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


@pytest.mark.parametrize("size", [(0, 4), (4,), (2.5, 3), (-1, 3)])
def test_upsample_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        upsample_cams(torch.zeros(1, 2, 2), size)


def test_full_cam_pipeline_is_differentiable():
    """fmap -> CAM -> normalise -> upsample keeps a graph back to the features."""
    g = torch.Generator().manual_seed(7)
    fmap = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    weight = torch.randn(3, 8, generator=g)
    norm, deg = normalize_cams(class_activation_maps(fmap, weight, torch.tensor([0, 2])))
    up = upsample_cams(norm, (16, 16))
    up.mean().backward()
    assert not deg.any()
    assert math.isfinite(float(fmap.grad.abs().sum())) and fmap.grad.abs().sum() > 0
