"""The plugin through ``nn.DataParallel`` (PyCIL wraps its network for several GPUs).

On a CPU-only machine ``nn.DataParallel(module)`` just holds the module and calls it; with CUDA the
test also runs on one GPU (``device_ids=[0]``). Wrapped and unwrapped networks must give the same
CAMs, features, boxes, memories, class means and φ updates.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cim_plugin.config import CIMConfig
from cim_plugin.core.memory import CompressedExemplarMemory
from cim_plugin.pycil import nets
from cim_plugin.pycil.data import Normalizer
from cim_plugin.pycil.learner import CIMLearnerMixin

from fakes import FakeBaseLearner

H = 8  # image side
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Backbone(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.out_dim = width

    def forward(self, x):
        f = self.relu(self.conv(x))
        return {"fmaps": [f], "features": f.mean((2, 3))}


class DictLinear(nn.Linear):
    """PyCIL's SimpleLinear: a weight, and a dict out."""

    def forward(self, x):
        return {"logits": super().forward(x)}


class IncNet(nn.Module):
    """IncrementalNet's shape: one ``convnet``."""

    def __init__(self, classes=3):
        super().__init__()
        self.convnet = Backbone()
        self.fc = DictLinear(4, classes)

    @property
    def feature_dim(self):
        return self.convnet.out_dim

    def extract_vector(self, x):
        return self.convnet(x)["features"]

    def forward(self, x):
        feats = self.extract_vector(x)
        return {**self.fc(feats), "features": feats}


class DERLikeNet(nn.Module):
    """DERNet's shape: several ``convnets``, features concatenated, one fc over all of them."""

    def __init__(self, classes=3):
        super().__init__()
        self.convnets = nn.ModuleList([Backbone(), Backbone()])
        self.fc = DictLinear(8, classes)

    @property
    def feature_dim(self):
        return sum(b.out_dim for b in self.convnets)

    def extract_vector(self, x):
        return torch.cat([b(x)["features"] for b in self.convnets], 1)

    def forward(self, x):
        feats = self.extract_vector(x)
        return {**self.fc(feats), "features": feats}


NETS = {"inc": IncNet, "der": DERLikeNet}


def wrap(net, device, monkeypatch):
    """``nn.DataParallel`` as PyCIL builds it: CPU-only semantics on "cpu", one GPU on "cuda"."""
    if device == "cpu":
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: False)
            dp = nn.DataParallel(net)
        assert dp.device_ids == []
        return dp
    return nn.DataParallel(net, device_ids=[0])


def make_net(kind, device):
    torch.manual_seed(0)
    return NETS[kind]().to(device)


def batch(device, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, H, H, 3), generator=g, dtype=torch.uint8).numpy()
    return raw, np.arange(n) % 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(NETS))
def test_net_helpers_see_through_the_wrapper(kind, device, monkeypatch):
    net = make_net(kind, device)
    dp = wrap(net, device, monkeypatch)
    raw, labels = batch(device)
    x = Normalizer()(raw, device)
    y = torch.as_tensor(labels, device=device)
    assert nets.unwrap(dp) is net and nets.unwrap(wrap(dp, device, monkeypatch)) is net  # nested wrappers too
    assert all(a is b for a, b in zip(nets.backbones(dp), nets.backbones(net)))
    assert len(nets.backbones(dp)) == (2 if kind == "der" else 1)
    assert nets.classifier_weight(dp) is net.fc.weight
    assert nets.feature_dim(dp) == nets.feature_dim(net) == (8 if kind == "der" else 4)
    torch.testing.assert_close(nets.extract_vector(dp, x), net.extract_vector(x))
    cam_w, feats_w = nets.cam_and_features(dp, x, y)
    cam, feats = nets.cam_and_features(net, x, y)
    torch.testing.assert_close(cam_w, cam)
    torch.testing.assert_close(feats_w, feats)


class Learner(CIMLearnerMixin, FakeBaseLearner):
    pass


def learner(net, device, mask, **keys):
    lrn = Learner(net, device)
    lrn.cim_setup(CIMConfig.from_args({"cim": True, "model_name": "icarl", "cim_mask": mask, "cam_batch_size": 3, **keys}))
    lrn.cim.use_memory(CompressedExemplarMemory((H, H, 3), 4.0))
    return lrn


def both(kind, device, mask, monkeypatch, **keys):
    """Two learners over networks with the same weights, the second wrapped in DataParallel."""
    net = make_net(kind, device)
    twin = copy.deepcopy(net)
    return learner(net, device, mask, **keys), learner(wrap(twin, device, monkeypatch), device, mask, **keys)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", ["cam", "pau"])
@pytest.mark.parametrize("kind", sorted(NETS))
def test_mixin_passes_are_the_same_wrapped(kind, mask, device, monkeypatch):
    plain, wrapped = both(kind, device, mask, monkeypatch)
    raw, labels = batch(device)
    for a, b in zip(plain.cim.encoder.cams(raw, labels), wrapped.cim.encoder.cams(raw, labels)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain.cim.encoder.features(raw), wrapped.cim.encoder.features(raw))
    a, b = plain.cim.builder.boxes(raw, labels), wrapped.cim.builder.boxes(raw, labels)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.fallback, b.fallback)
    torch.testing.assert_close(a.features, b.features)
    if mask == "pau":
        assert all(a is b for a, b in zip(wrapped.cim.branch().backbones, nets.backbones(wrapped._network)))


class ArrayDM:
    use_path = False

    def __init__(self, raw, labels):
        self.raw, self.labels = raw, labels

    def class_items(self, label):
        idx = np.flatnonzero(self.labels == label)
        return self.raw[idx], idx

    def object_boxes(self, positions):  # no object boxes known
        return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(NETS))
def test_memory_and_class_means_are_the_same_wrapped(kind, device, monkeypatch):
    raw, labels = batch(device, n=12, seed=1)
    dm = ArrayDM(raw, labels)
    out = []
    for lrn in both(kind, device, "cam", monkeypatch):
        for label in range(3):
            lrn.cim.fill_class(dm, label, 2.0)
        out.append((lrn.cim.memory, lrn.cim.builder.class_means(3, nets.feature_dim(lrn._network))))
    (mem_a, means_a), (mem_b, means_b) = out
    assert mem_a.labels == mem_b.labels == [0, 1, 2]
    for label in mem_a.labels:
        np.testing.assert_array_equal(mem_a.images(label), mem_b.images(label))
    assert means_a.shape == (3, nets.feature_dim(NETS[kind]()))
    np.testing.assert_allclose(means_a, means_b, rtol=1e-5, atol=1e-6)


class TrainSet(torch.utils.data.Dataset):
    def __init__(self, raw, labels):
        self.x = Normalizer()(raw)
        self.y = labels

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return i, self.x[i], int(self.y[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(NETS))
def test_mask_steps_are_the_same_wrapped(kind, device, monkeypatch):
    raw, labels = batch(device, n=8, seed=2)
    phis = []
    for lrn in both(kind, device, "pau", monkeypatch, meta_batch_size=4, num_meta_iters_per_cls=1):
        lrn.cim.train_set = TrainSet(raw, labels)  # the clean new-class set; no exemplars yet
        opt = torch.optim.SGD(nets.unwrap(lrn._network).parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
        before = [p.detach().clone() for p in lrn.cim.branch().parameters()]
        torch.manual_seed(5)  # the meta batches' shuffle
        lrn.cim.mask_steps(sched)
        after = [p.detach().clone() for p in lrn.cim.branch().parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # φ was trained
        phis.append(after)
    for a, b in zip(*phis):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_icarl_loss_reads_a_wrapped_old_network(device, monkeypatch):
    from cim_plugin.pycil.losses import icarl_loss

    import sys
    import types

    monkeypatch.setitem(sys.modules, "models.icarl", types.SimpleNamespace(T=2))
    net = make_net("inc", device)
    raw, labels = batch(device)
    x = Normalizer()(raw, device)
    y = torch.as_tensor(labels, device=device)
    lrn = FakeBaseLearner(net, device)
    lrn._cur_task, lrn._known_classes = 1, 2
    torch.manual_seed(1)
    old = IncNet(classes=2).to(device)
    lrn._old_network = old
    plain = icarl_loss(lrn, net(x), x, y)
    lrn._old_network = wrap(copy.deepcopy(old), device, monkeypatch)
    torch.testing.assert_close(icarl_loss(lrn, net(x), x, y), plain)
