"""benchmarks/finer_maps.py (n): its Grad-CAM and its operating points."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cim_plugin.core.cam import class_activation_maps


@pytest.fixture
def finer_maps(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import finer_maps

    return finer_maps


class _Backbone(nn.Module):
    """Two stages (8 × 8 then 4 × 4) and global average pooling, with PyCIL's output dict."""

    def __init__(self):
        super().__init__()
        self.stage3 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.stage4 = nn.Conv2d(6, 5, 3, stride=2, padding=1)

    def forward(self, x):
        a3 = torch.relu(self.stage3(x))
        a4 = torch.relu(self.stage4(a3))
        return {"fmaps": [a3, a4], "features": a4.mean((2, 3))}


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5))

    def forward(self, feats):
        return {"logits": feats @ self.weight.t()}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.convnet, self.fc = _Backbone(), _Head()


def test_grad_cam_on_the_last_map_is_the_rectified_cam(finer_maps):
    """With average pooling and a linear head, ∂logit_y/∂A_c = w_yc / (h w): Grad-CAM on the last map
    is ReLU(CAM) / (h w), so the two must agree (and the θ of a frozen network needs no grad)."""
    torch.manual_seed(0)
    net = _Net().eval().requires_grad_(False)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 3])
    got, before_last = finer_maps.grad_cams(net, x, y, (-1, -2))
    out = net.convnet(x)
    cam = class_activation_maps(out["fmaps"][-1], net.fc.weight, y)
    torch.testing.assert_close(got, torch.relu(cam) / 16)
    assert before_last.shape == (3, 8, 8)


def test_operating_point_takes_the_smallest_area_that_reaches_the_recall(finer_maps):
    curve = [{"tau": 0.3, "mean_box_area": 0.5, "mean_recall": 0.99},
             {"tau": 0.5, "mean_box_area": 0.3, "mean_recall": 0.96},
             {"tau": 0.7, "mean_box_area": 0.2, "mean_recall": 0.80}]
    assert finer_maps.operating_point(curve, 0.95)["tau"] == 0.5
    assert finer_maps.operating_point(curve, 0.999) is None
