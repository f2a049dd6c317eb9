"""Tests for cim_plugin.core.branch: the PAU mask branch sharing every conv/BN tensor with the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cim_plugin.core.branch import PAUBranch, relu_sites
from cim_plugin.core.pau import PAU



pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """PyCIL-style BasicBlock: ONE ``self.relu`` called twice."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class TinyNet(nn.Module):
    def __init__(self, c: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        self.layer1 = Block(c)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x0 = self.stem(x)
        x1 = self.layer1(x0)
        return {"fmaps": [x0, x1], "features": x1.mean(dim=(2, 3))}


class FunctionalReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"fmaps": [F.relu(self.conv(x))], "features": None}


SITES = ["stem.2", "layer1.relu"]


def _x(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _perturb(branch: PAUBranch, index: int, amount: float = 0.3) -> None:
    with torch.no_grad():
        for p in branch.paus[index].parameters():
            p.add_(amount)


def _relus(net: TinyNet) -> list[nn.Module]:
    return [net.stem[2], net.layer1.relu]


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------


def test_relu_sites_one_per_instance():
    net = TinyNet()
    assert relu_sites(net) == SITES
    net.alias = net.layer1.relu  # the same instance under a second name is still one site
    assert relu_sites(net) == SITES
    assert relu_sites(FunctionalReluNet()) == []


def test_branch_parameters_are_only_phi():
    b0, b1 = TinyNet(seed=0), TinyNet(seed=1)
    branch = PAUBranch([b0, b1])
    assert branch.num_backbones == 2 and branch.sites(1) == SITES
    params = list(branch.parameters())
    assert len(params) == 2 * len(SITES) * 2
    pau_params = {id(p) for m in branch.modules() if isinstance(m, PAU) for p in m.parameters()}
    assert {id(p) for p in params} == pau_params
    theta = {id(p) for net in (b0, b1) for p in net.parameters()}
    assert theta.isdisjoint(id(p) for p in params)
    keys = set(branch.state_dict())
    assert keys == {f"paus.{i}.{s.replace('.', '/')}.{c}" for i in (0, 1) for s in SITES
                    for c in ("numerator", "denominator")}
    # the backbones are not submodules, and the branch leaves the model's own tree alone
    assert all(not isinstance(m, (TinyNet, nn.Conv2d)) for m in branch.modules())
    assert not any(isinstance(m, PAU) for m in b0.modules())


def test_refuses_backbone_without_relu_modules():
    with pytest.raises(ValueError, match="F.relu"):
        PAUBranch([FunctionalReluNet()])
    assert PAUBranch([FunctionalReluNet()], require_sites=False).sites(0) == []
    with pytest.raises(ValueError):
        PAUBranch([])


# --------------------------------------------------------------------------------------------
# swapping
# --------------------------------------------------------------------------------------------


def test_activated_swaps_and_restores_identity():
    net = TinyNet()
    originals = _relus(net)
    branch = PAUBranch([net])
    with branch.activated(0) as bb:
        assert bb is net
        assert net.stem[2] is branch.pau(0, "stem.2")
        assert net.layer1.relu is branch.pau(0, "layer1.relu")
    assert all(a is b for a, b in zip(_relus(net), originals))


def test_restores_after_exception():
    net = TinyNet()
    originals = _relus(net)
    net.train()
    branch = PAUBranch([net])
    with pytest.raises(RuntimeError, match="boom"):
        with branch.activated(0):
            assert isinstance(net.layer1.relu, PAU)
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(_relus(net), originals))
    assert net.stem[1].training and net.layer1.bn1.training
    # and the branch is usable again (not stuck "active")
    branch.forward_backbone(0, _x())


def test_aliased_relu_swapped_everywhere():
    net = TinyNet()
    relu = net.layer1.relu
    net.alias = relu
    branch = PAUBranch([net])
    with branch.activated(0):
        assert net.alias is net.layer1.relu is branch.pau(0, "layer1.relu")
    assert net.alias is relu and net.layer1.relu is relu


def test_not_reentrant_for_same_backbone():
    branch = PAUBranch([TinyNet()])
    with branch.activated(0):
        with pytest.raises(RuntimeError):
            with branch.activated(0):
                pass


def test_branch_at_relu_fit_is_close_to_plain_network():
    net = TinyNet().eval()
    x = _x(n=4)
    with torch.no_grad():
        plain = net(x)
        pre_relu = net.stem[1](net.stem[0](x))
        assert pre_relu.abs().max() < 3  # inside the fitted range
        (out,) = PAUBranch([net])(x)
    for a, b in zip(plain["fmaps"], out["fmaps"]):
        assert (a - b).abs().max() < 0.1
    assert (plain["features"] - out["features"]).abs().max() < 0.05
    assert not torch.equal(plain["features"], out["features"])  # the PAUs did run


def test_bn_eval_flags_restored_and_stats_untouched():
    net = TinyNet()
    net.train()
    net.layer1.bn2.eval()  # a mixed state must come back exactly
    flags = {n: m.training for n, m in net.named_modules()}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    branch = PAUBranch([net])
    with branch.activated(0):
        assert not any(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        assert net.training  # only BN layers are switched
        net(_x())
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in stats.items())
    # bn_eval=False leaves BN in train mode: running statistics move
    branch.forward_backbone(0, _x(), bn_eval=False)
    assert not torch.equal(stats["stem.1.running_mean"], net.state_dict()["stem.1.running_mean"])


def test_forward_runs_every_backbone_with_its_own_paus():
    b0, b1 = TinyNet(seed=0), TinyNet(seed=1)
    branch = PAUBranch([b0, b1])
    x = _x()
    outs = branch(x)
    assert len(outs) == 2 and b0.calls == 1 and b1.calls == 1
    _perturb(branch, 1)
    outs2 = branch(x)
    assert torch.equal(outs[0]["features"], outs2[0]["features"])
    assert not torch.allclose(outs[1]["features"], outs2[1]["features"])


# --------------------------------------------------------------------------------------------
# sharing θ, training φ
# --------------------------------------------------------------------------------------------


def test_sgd_step_on_backbone_changes_branch_output():
    net = TinyNet()
    branch = PAUBranch([net])
    x = _x()
    before = branch.forward_backbone(0, x)["features"].detach().clone()
    convs = [p for n, p in net.named_parameters() if "conv" in n or n.startswith("stem.0")]
    opt = torch.optim.SGD(convs, lr=0.5)
    net(x)["features"].pow(2).sum().backward()
    opt.step()
    after = branch.forward_backbone(0, x)["features"]
    assert not torch.allclose(before, after)
    assert all(p.grad is None for p in branch.parameters())  # plain forward never touched φ


def test_phi_gradients_flow_through_branch():
    net = TinyNet()
    branch = PAUBranch([net])
    branch.forward_backbone(0, _x())["features"].sum().backward()
    assert all(p.grad is not None for p in branch.parameters())
    assert sum(p.grad.abs().sum() for p in branch.parameters()) > 0


def test_functional_call_with_fast_weights_inside_activated():
    net = TinyNet()
    branch = PAUBranch([net])
    x, x2 = _x(1), _x(2)
    names = [n for n, _ in net.named_parameters()]  # collected outside activated()
    theta = dict(net.named_parameters())
    # inner step on the branch output (depends on φ), keeping the graph
    inner = branch.forward_backbone(0, x)["features"].pow(2).sum()
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    fast = {n: theta[n] - 0.1 * g for n, g in zip(names, grads)}
    phi = list(branch.parameters())
    with branch.activated(0) as bb:
        out = functional_call(bb, fast, (x2,))
    loss = out["features"].pow(2).sum()
    g_fast = torch.autograd.grad(loss, list(fast.values()), retain_graph=True)
    assert all(g is not None for g in g_fast) and sum(g.abs().sum() for g in g_fast) > 0
    g_phi = torch.autograd.grad(loss, phi, retain_graph=True)
    assert all(torch.isfinite(g).all() for g in g_phi) and sum(g.abs().sum() for g in g_phi) > 0
    # the pure bilevel path: outer loss on the plain network (ReLU) with fast weights still
    # reaches φ, through θ⁺ only (second-order through the PAUs)
    plain = functional_call(net, fast, (x2,))["features"].pow(2).sum()
    g_bilevel = torch.autograd.grad(plain, phi)
    assert sum(g.abs().sum() for g in g_bilevel) > 0
    # the fast weights did not leak into the module
    assert all(p is theta[n] for n, p in net.named_parameters())


# --------------------------------------------------------------------------------------------
# growth, freezing, persistence
# --------------------------------------------------------------------------------------------


def test_sync_copies_previous_backbone_coefficients():
    b0, b1, b2 = TinyNet(seed=0), TinyNet(seed=1), TinyNet(seed=2)
    branch = PAUBranch([b0])
    _perturb(branch, 0, 0.25)
    assert branch.sync([b0, b1], train_old=False) == [1]
    for site in SITES:
        old, new = branch.pau(0, site), branch.pau(1, site)
        assert torch.equal(old.numerator, new.numerator) and torch.equal(old.denominator, new.denominator)
        assert old.numerator is not new.numerator
    fresh = PAU()
    assert not torch.equal(branch.pau(1, "stem.2").numerator, fresh.numerator)
    # drops none
    with pytest.raises(ValueError):
        branch.sync([b0], train_old=True)
    assert branch.sync([b0, b1, b2], train_old=True) == [2]
    assert branch.num_backbones == 3


def test_old_paus_frozen_only_when_asked():
    b0, b1 = TinyNet(seed=0), TinyNet(seed=1)
    branch = PAUBranch([b0])
    for p in b0.parameters():  # the CIL learner freezes the old backbone's conv/BN
        p.requires_grad_(False)
    assert all(p.requires_grad for p in branch.parameters())
    branch.sync([b0, b1], train_old=True)
    assert all(p.requires_grad for p in branch.parameters())
    branch.sync([b0, b1], train_old=False)
    assert not any(p.requires_grad for p in branch.paus[0].parameters())
    assert all(p.requires_grad for p in branch.paus[1].parameters())
    assert len(branch.trainable_parameters()) == 2 * len(SITES)
    branch.set_trainable([0], True)
    assert all(p.requires_grad for p in branch.parameters())
    branch.freeze_backbone_paus([1])
    assert not any(p.requires_grad for p in branch.paus[1].parameters())
    with pytest.raises(TypeError):
        branch.sync([b0, b1])  # train_old is required: no implicit choice


def test_state_dict_round_trip():
    b0, b1 = TinyNet(seed=0), TinyNet(seed=1)
    branch = PAUBranch([b0, b1])
    _perturb(branch, 0, 0.1)
    _perturb(branch, 1, -0.2)
    state = branch.state_dict()
    other = PAUBranch([b0, b1])
    assert not torch.equal(other.pau(1, "layer1.relu").numerator, branch.pau(1, "layer1.relu").numerator)
    other.load_state_dict(state)
    for a, b in zip(branch.parameters(), other.parameters()):
        assert torch.equal(a, b)
    x = _x()
    torch.testing.assert_close(branch(x)[1]["features"], other(x)[1]["features"], rtol=0, atol=0)


def test_deepcopy_does_not_copy_backbones():
    net = TinyNet()
    branch = PAUBranch([net])
    clone = copy.deepcopy(branch)
    assert branch.backbones[0] is net  # the original keeps its reference
    with pytest.raises(RuntimeError, match="attach"):
        clone(_x())
    clone.attach([net])
    torch.testing.assert_close(clone(_x())[0]["features"], branch(_x())[0]["features"])
    with pytest.raises(ValueError):
        clone.attach([FunctionalReluNet()])


def test_fused_pau_matches_reference_through_first_and_second_order_paths():
    """φ-gradients through the branch (first order, the fused node's own backward) and through an
    inner step taken on the branch with ``create_graph`` (second order, its recomputed graph) are
    those of the per-op reference PAU, in float64."""
    from cim_plugin.core.pau import use_fused_pau

    results = {}
    for fused in (True, False):
        net = TinyNet().double()
        branch = PAUBranch([net]).double()
        _perturb(branch, 0, 0.05)
        x, x2 = _x(1).double(), _x(2).double()
        phi = list(branch.parameters())
        theta = dict(net.named_parameters())
        with use_fused_pau(fused):
            first = torch.autograd.grad(branch.forward_backbone(0, x)["features"].pow(2).sum(), phi)
            inner = branch.forward_backbone(0, x)["features"].pow(2).sum()
            grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
            fast = {n: p - 0.1 * g for (n, p), g in zip(theta.items(), grads)}
            with branch.activated(0) as bb:
                outer = functional_call(bb, fast, (x2,))["features"].pow(2).sum()
            second = torch.autograd.grad(outer, phi)
        results[fused] = first + second
    for new, ref in zip(results[True], results[False]):
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(new, ref, rtol=1e-11, atol=1e-11 * float(ref.abs().max()))
