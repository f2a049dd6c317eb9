"""The bilevel mask step: ∂L_outer/∂φ reaches φ through the inner step (finite differences)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cim_plugin.core.bilevel import BilevelSettings, mask_step, outer_loss, outer_terms, soft_masks
from cim_plugin.core.cam import class_activation_maps
from cim_plugin.core.pau import PAU


class TinyNet(nn.Module):
    """conv-ReLU-conv-ReLU, global pool, linear: returns {"logits", "fmap"}."""

    def __init__(self, k=3):
        super().__init__()
        self.convnet = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(5, k)

    def forward(self, x):
        fmap = self.convnet(x)
        return {"logits": self.fc(fmap.mean((2, 3))), "fmap": fmap}


def make_problem(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = TinyNet().to(dtype)
    paus = nn.ModuleList([PAU(), PAU()]).to(dtype)
    with torch.no_grad():  # move φ off the ReLU fit so that the problem is generic
        for p in paus.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def branch_fn(x, y):
        params = {n: p.detach() for n, p in net.named_parameters()}
        h = functional_call(net.convnet[0], {"weight": params["convnet.0.weight"], "bias": params["convnet.0.bias"]}, (x,))
        h = paus[0](h)
        h = functional_call(net.convnet[2], {"weight": params["convnet.2.weight"], "bias": params["convnet.2.bias"]}, (h,))
        fmap = paus[1](h)
        w = params["fc.weight"]
        return class_activation_maps(fmap, w, y), fmap.mean((2, 3)) @ w.T + params["fc.bias"]

    def cil_loss(outputs, x, y):
        return nn.functional.cross_entropy(outputs["logits"], y)

    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    y = torch.tensor([0, 1, 2, 1])
    x2 = torch.randn(4, 3, 8, 8, dtype=dtype)
    y2 = torch.tensor([2, 0, 1, 0])
    theta = [n for n, _ in net.named_parameters() if n.startswith("convnet.")]
    return net, paus, branch_fn, cil_loss, (x, y), (x2, y2), theta


def _loss(mode, inner_lr=0.5):
    net, paus, branch_fn, cil_loss, inner, outer, theta = make_problem()
    settings = BilevelSettings(factor=2, mode=mode)

    def loss():
        return outer_loss(outer_terms(net, theta, branch_fn, cil_loss, inner, outer, inner_lr, settings), settings)[0]

    return loss, paus


def test_outer_gradient_matches_finite_differences():
    loss, paus = _loss("bilevel")
    phi = list(paus.parameters())
    grads = torch.autograd.grad(loss(), phi)
    eps, checked = 1e-6, 0
    for p, g in zip(phi, grads):
        for i in range(0, p.numel(), 3):
            p.data.view(-1)[i] += eps
            plus = float(loss().detach())
            p.data.view(-1)[i] -= 2 * eps
            minus = float(loss().detach())
            p.data.view(-1)[i] += eps
            fd = (plus - minus) / (2 * eps)
            assert float(g.view(-1)[i]) == pytest.approx(fd, rel=1e-4, abs=1e-7)
            checked += 1
    assert checked >= 4


def test_cutting_the_inner_step_changes_the_gradient():
    loss_b, paus_b = _loss("bilevel")
    g_b = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_b(), list(paus_b.parameters()))])
    loss_j, paus_j = _loss("joint")
    g_j = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_j(), list(paus_j.parameters()))])
    assert (g_b - g_j).norm() > 1e-3 * g_b.norm()
    # without the inner step the CE of the model on x' does not depend on φ at all
    assert g_j.norm() > 0


def test_mask_step_changes_only_phi_and_respects_clip():
    net, paus, branch_fn, cil_loss, inner, outer, theta = make_problem(torch.float32)
    before_theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    before_phi = [p.detach().clone() for p in paus.parameters()]
    opt = torch.optim.SGD(paus.parameters(), lr=1.0)
    parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.1, list(paus.parameters()), opt,
                      BilevelSettings(factor=2, max_phi_grad_norm=1e-3))
    for n, p in net.named_parameters():
        assert torch.equal(p, before_theta[n]), n
    delta = torch.cat([(p - b).reshape(-1) for p, b in zip(paus.parameters(), before_phi)])
    assert 0 < delta.norm() <= 1e-3 + 1e-6  # SGD lr 1: the step is the clipped gradient
    assert parts["phi_grad_norm"] > 0 and set(parts) >= {"outer_ce", "branch_ce", "mask_reg"}
    frozen = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.1, list(paus.parameters()), opt,
                       BilevelSettings(factor=2, mode="none"))
    assert frozen == {}


def test_soft_masks_are_in_unit_range_and_zero_for_degenerate_cams():
    cam = torch.stack([torch.rand(3, 3), torch.full((3, 3), 2.0)])
    m = soft_masks(cam, (6, 6))
    assert m.shape == (2, 1, 6, 6) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert float(m[1].abs().sum()) == 0


def test_a_step_with_a_non_finite_loss_leaves_phi_and_adam_untouched():
    net, paus, branch_fn, cil_loss, inner, outer, theta = make_problem()
    phi = list(paus.parameters())
    before = [p.detach().clone() for p in phi]
    opt = torch.optim.Adam(phi, lr=0.1)
    x2, y2 = outer
    bad_outer = (torch.full_like(x2, float("nan")), y2)
    parts = mask_step(net, theta, branch_fn, cil_loss, inner, bad_outer, 0.5, phi, opt, BilevelSettings(factor=2))
    assert parts["skipped"] == 1 and all(torch.equal(a, p) for a, p in zip(before, phi))
    assert not opt.state  # Adam's moments never saw the bad step
    parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.5, phi, opt, BilevelSettings(factor=2))
    assert parts["skipped"] == 0 and any(not torch.equal(a, p) for a, p in zip(before, phi))


def test_bn_batch_statistics_uses_the_batch_and_keeps_running_stats():
    from cim_plugin.core.bilevel import bn_batch_statistics

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    bn = net[1]
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    x = 5 + 3 * torch.randn(8, 3, 6, 6)
    with bn_batch_statistics(net):
        out = net(x)
        assert bn.training and not net[0].training
    pre = net[0](x)
    expect = torch.relu((pre - pre.mean((0, 2, 3), keepdim=True)) / torch.sqrt(pre.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
                        * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    assert torch.allclose(out, expect, atol=1e-5)
    assert all(torch.equal(saved[k], v) for k, v in bn.state_dict().items())  # running stats, count untouched
    assert not bn.training and bn.track_running_stats  # flags restored
    assert not torch.allclose(net(x), out, atol=1e-3)  # eval mode again: running statistics


def test_fused_and_reference_pau_give_the_same_mask_step_float64():
    """The fused PAU node (first-order backward by hand) changes nothing but round-off: the
    φ-gradient of the bilevel objective and the φ after one Adam step match the per-op graph."""
    from cim_plugin.core.pau import use_fused_pau

    grads, steps = {}, {}
    for fused in (True, False):
        loss, paus = _loss("bilevel")
        with use_fused_pau(fused):
            grads[fused] = torch.autograd.grad(loss(), list(paus.parameters()))
        net, paus, branch_fn, cil_loss, inner, outer, theta = make_problem()
        phi = list(paus.parameters())
        opt = torch.optim.Adam(phi, lr=0.01)
        with use_fused_pau(fused):
            parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.5, phi, opt, BilevelSettings(factor=2))
        assert parts["skipped"] == 0
        steps[fused] = [p.detach().clone() for p in phi]
    scale = max(float(g.abs().max()) for g in grads[False])
    for new, ref in zip(grads[True], grads[False]):
        assert float((new - ref).abs().max()) <= 1e-12 * scale
    for new, ref in zip(steps[True], steps[False]):
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)


def test_outer_terms_reach_phi_as_documented():
    """The stepped model's CE reaches φ through the inner step only (bilevel), never in joint mode
    (θ itself does not depend on φ); the branch CE and the mask regulariser reach φ in both; and
    outer_loss is the terms' weighted sum (benchmarks/phi_terms.py isolates them this way)."""
    net, paus, branch_fn, cil_loss, inner, outer, theta = make_problem()
    phi = list(paus.parameters())

    def grad_norm(term, mode):
        terms = outer_terms(net, theta, branch_fn, cil_loss, inner, outer, 0.5, BilevelSettings(factor=2, mode=mode))
        grads = torch.autograd.grad(terms[term], phi, allow_unused=True)
        return sum(float(g.norm()) for g in grads if g is not None)

    assert grad_norm("outer_ce", "bilevel") > 1e-6
    assert grad_norm("outer_ce", "joint") == 0.0
    for mode in ("bilevel", "joint"):
        assert grad_norm("branch_ce", mode) > 1e-6 and grad_norm("mask_reg", mode) > 1e-6
    settings = BilevelSettings(factor=2, div_coef=0.3, reg_coef=0.7)
    terms = outer_terms(net, theta, branch_fn, cil_loss, inner, outer, 0.5, settings)
    total, parts = outer_loss(terms, settings)
    expected = terms["outer_ce"] + 0.3 * terms["branch_ce"] + 0.7 * terms["mask_reg"]
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert parts["mask_mean"] == pytest.approx(float(terms["mask"].detach().mean()), rel=1e-12)
