"""Tests for cim_plugin.core.pau: the ReLU fit, the safe PAU forms, finiteness in fp32/fp16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cim_plugin.core.pau import (
    PAU,
    RELU_FIT_MAX_ERROR,
    RELU_INIT_DENOMINATOR,
    RELU_INIT_NUMERATOR,
    fit_relu_coefficients,
    pade_max_error,
    pau_function,
    use_fused_pau,
)



pytestmark = pytest.mark.usefixtures("one_thread")

EXTREME = [1e3, -1e3, 100.0, -100.0, 0.0]


def _reference(x: np.ndarray, a, b, version: str) -> np.ndarray:
    """Direct (non-Horner) evaluation of the safe PAU in float64."""
    num = sum(c * x**j for j, c in enumerate(a))
    if version == "B":
        den = 1.0 + np.abs(sum(c * x ** (k + 1) for k, c in enumerate(b)))
    else:
        den = 1.0 + sum(np.abs(c * x ** (k + 1)) for k, c in enumerate(b))
    return num / den


# --------------------------------------------------------------------------------------------
# the ReLU fit
# --------------------------------------------------------------------------------------------


def test_fit_reproduces_stored_constants():
    fit = fit_relu_coefficients()
    np.testing.assert_allclose(fit.numerator, RELU_INIT_NUMERATOR, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.denominator, RELU_INIT_DENOMINATOR, rtol=0, atol=1e-6)
    assert abs(pade_max_error(fit.numerator, fit.denominator) - RELU_FIT_MAX_ERROR) < 1e-6


def test_fit_is_deterministic_and_fast():
    import time

    t = time.perf_counter()
    a = fit_relu_coefficients()
    elapsed = time.perf_counter() - t
    assert a == fit_relu_coefficients()
    assert elapsed < 2.0


def test_stored_max_error_is_small_and_holds_for_the_module():
    assert RELU_FIT_MAX_ERROR <= 0.1
    x = torch.linspace(-3.0, 3.0, 200001)
    for version in ("A", "B"):
        err32 = (PAU(version=version)(x) - x.relu()).abs().max().item()
        assert err32 <= RELU_FIT_MAX_ERROR + 1e-6, version
        xd = x.double()
        err64 = (PAU(version=version).double()(xd) - xd.relu()).abs().max().item()
        assert err64 <= RELU_FIT_MAX_ERROR + 1e-6, version  # coefficients rounded to float32
    # the stored error is attained (not a loose bound)
    assert err64 > RELU_FIT_MAX_ERROR - 1e-4


def test_fit_has_even_nonnegative_denominator():
    # what makes versions A and B coincide at initialisation
    b = RELU_INIT_DENOMINATOR
    assert b[0] == 0.0 and b[2] == 0.0 and b[1] > 0 and b[3] > 0


@pytest.mark.parametrize("degrees", [(3, 2), (6, 5)])
def test_other_degrees_fit_and_initialise(degrees):
    fit = fit_relu_coefficients(*degrees)
    assert len(fit.numerator) == degrees[0] + 1 and len(fit.denominator) == degrees[1]
    assert fit.max_error < 0.1
    pau = PAU(*degrees)
    assert pau.degrees == degrees
    expect = torch.tensor(fit.numerator, dtype=torch.float64)
    torch.testing.assert_close(pau.numerator.detach().double(), expect)


def test_init_range_widens_the_interval_where_the_pau_follows_relu():
    # r = 3 is the official fit; r = 6 is the same coefficients on x / 2, scaled by 2 (ReLU is
    # homogeneous): it follows ReLU out to [-6, 6], and φ's parameters keep the official scale
    default, wide = PAU(), PAU(init_range=6.0)
    assert PAU(init_range=3.0).input_scale == 1.0 and wide.input_scale == 2.0
    assert wide.numerator.tolist() == default.numerator.tolist()
    assert wide.denominator.tolist() == default.denominator.tolist()
    x = torch.linspace(-6.0, 6.0, 60001, dtype=torch.float64)
    err_default = (default.double()(x) - x.relu()).abs().max().item()
    err_wide = (wide.double()(x) - x.relu()).abs().max().item()
    assert err_wide < 2 * RELU_FIT_MAX_ERROR + 1e-5 < 0.05 < err_default
    # the same function as a direct fit on [-6, 6]
    fit = fit_relu_coefficients(lo=-6.0, hi=6.0)
    direct = PAU(numerator_init=fit.numerator, denominator_init=fit.denominator).double()
    torch.testing.assert_close(wide.double()(x), direct(x), atol=1e-4, rtol=0)
    # gradients reach the coefficients through the scaling
    wide(torch.randn(100) * 5).sum().backward()
    assert wide.numerator.grad.abs().sum() > 0 and wide.denominator.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="init_range"):
        PAU(init_range=0.0)


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError):
        fit_relu_coefficients(0, 4)
    with pytest.raises(ValueError):
        fit_relu_coefficients(lo=1.0, hi=-1.0)


# --------------------------------------------------------------------------------------------
# the PAU forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["A", "B"])
def test_forward_matches_direct_formula(version):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)  # mixed signs: A and B differ
    x = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    expect = _reference(x.numpy(), a.tolist(), b.tolist(), version)
    np.testing.assert_allclose(pau_function(x, a, b, version).numpy(), expect, rtol=1e-12, atol=1e-12)
    pau = PAU(version=version, numerator_init=a, denominator_init=b)  # stored as float32
    np.testing.assert_allclose(pau(x.float()).detach().double().numpy(), expect, rtol=1e-5, atol=1e-5)


def test_versions_differ_off_init():
    a, b = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, -1.0, 0.0]
    x = torch.tensor([0.5, 2.0])
    assert not torch.allclose(PAU(numerator_init=a, denominator_init=b, version="A")(x),
                              PAU(numerator_init=a, denominator_init=b, version="B")(x))


def test_parameters_shapes_and_not_in_place():
    pau = PAU()
    assert [n for n, _ in pau.named_parameters()] == ["numerator", "denominator"]
    assert pau.numerator.shape == (6,) and pau.denominator.shape == (4,)
    x = torch.randn(3, 4)
    keep = x.clone()
    y = pau(x)
    assert torch.equal(x, keep) and y.data_ptr() != x.data_ptr()


def test_version_a_zero_coefficients_get_gradients():
    pau = PAU(version="A")
    pau(torch.tensor([0.5, -1.0, 2.0])).sum().backward()
    assert (pau.denominator.grad != 0).all()


def test_bad_init_and_version_rejected():
    with pytest.raises(ValueError):
        PAU(numerator_init=[1.0, 2.0])
    with pytest.raises(ValueError):
        PAU(version="C")


# --------------------------------------------------------------------------------------------
# finiteness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_outputs_and_gradients_at_extremes(dtype, version):
    pau = PAU(version=version)
    x = torch.tensor(EXTREME, dtype=dtype, requires_grad=True)
    y = pau(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    (y.float() * torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])).sum().backward()
    for g in (x.grad, pau.numerator.grad, pau.denominator.grad):
        assert g is not None and torch.isfinite(g).all()
    assert x.grad.dtype == dtype and pau.numerator.grad.dtype == torch.float32


def test_finite_in_half_module_and_slope_far_out():
    pau = PAU().half()
    x = torch.tensor(EXTREME, dtype=torch.float16, requires_grad=True)
    y = pau(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(pau.numerator.grad).all() and torch.isfinite(pau.denominator.grad).all()
    # at the ReLU fit the PAU grows like a_5/b_4 · x ≈ x/2 far outside [-3, 3] (documented)
    assert abs(y[0].item() / 1e3 - 0.5) < 0.01


def test_fp16_overflow_is_clamped_not_inf():
    pau = PAU(numerator_init=[0, 0, 0, 0, 0, 1e3], denominator_init=[0, 0, 0, 0])
    y = pau(torch.tensor([1e3, -1e3], dtype=torch.float16))
    assert torch.isfinite(y).all() and y[0] == torch.finfo(torch.float16).max


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("version", ["A", "B"])
def test_gradcheck_double(version, fused):
    x = torch.tensor([-2.5, -0.3, 0.2, 1.7, 50.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(RELU_INIT_NUMERATOR, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, 9.0, -0.2, 0.9], dtype=torch.float64, requires_grad=True)  # no kinks hit
    fn = lambda inp, num, den: pau_function(inp, num, den, version)  # noqa: E731
    with use_fused_pau(fused):
        assert torch.autograd.gradcheck(fn, (x, a, b))
        assert torch.autograd.gradgradcheck(fn, (x, a, b))


def test_second_order_gradients_exist():
    # the bilevel step differentiates through a gradient of the PAU
    pau = PAU()
    x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    (gx,) = torch.autograd.grad(pau(x).pow(2).sum(), x, create_graph=True)
    g2 = torch.autograd.grad(gx.sum(), [pau.numerator, pau.denominator])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in g2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_no_grad_path_is_bit_identical_to_the_graph_path(dtype, fused, monkeypatch):
    monkeypatch.setattr("cim_plugin.core.pau._FUSED", fused)
    pau = PAU()
    with torch.no_grad():
        pau.numerator.add_(0.01 * torch.randn(pau.numerator.shape, generator=torch.Generator().manual_seed(1)))
    x = (4 * torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))).to(dtype)
    with torch.no_grad():
        fast = pau(x)
    graph = pau(x.clone().requires_grad_())
    assert graph.requires_grad and fast.dtype == graph.dtype == dtype
    assert torch.equal(fast, graph.detach())
    assert torch.equal(x, (4 * torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))).to(dtype))  # input untouched


# --------------------------------------------------------------------------------------------
# the fused version-B node (one autograd node, hand-written first-order backward)
# --------------------------------------------------------------------------------------------


def _generic(num_degree: int, den_degree: int, seed: int, dtype=torch.float64):
    """Random coefficients with mixed signs (b_1 ≠ 0: no even-denominator symmetry) and an input
    with exact zeros (D = 0, the kink of |D|), far values, and a 4-D shape."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(num_degree + 1, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(den_degree, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    x = (3 * torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)).to(dtype)
    x.view(-1)[:3] = torch.tensor([0.0, 40.0, -40.0], dtype=dtype)
    return x, a, b


def _value_and_grads(x, a, b, fused: bool, need=(True, True, True), seed: int = 7):
    x, a, b = (t.detach().clone().requires_grad_(n) for t, n in zip((x, a, b), need))
    with use_fused_pau(fused):
        y = pau_function(x, a, b, "B")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    inputs = [t for t, n in zip((x, a, b), need) if n]
    return y.detach(), torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("degrees", [(5, 4), (1, 1), (2, 1), (3, 2), (6, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_matches_reference_values_and_gradients_float64(degrees, seed):
    x, a, b = _generic(*degrees, seed)
    y_ref, g_ref = _value_and_grads(x, a, b, fused=False)
    y_new, g_new = _value_and_grads(x, a, b, fused=True)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-13, atol=1e-13)
    for name, new, ref in zip("xab", g_new, g_ref):
        assert new.shape == ref.shape, name
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max())), name


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True), (True, True, False)])
def test_fused_backward_with_only_some_inputs_requiring_grad(need):
    x, a, b = _generic(5, 4, 3)
    _, g_ref = _value_and_grads(x, a, b, fused=False, need=need)
    _, g_new = _value_and_grads(x, a, b, fused=True, need=need)
    assert len(g_new) == sum(need)
    for new, ref in zip(g_new, g_ref):
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def test_fused_matches_reference_in_float32_and_float64_truth():
    x, a, b = _generic(5, 4, 4)
    x = torch.randn(16, 8, 12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    _, g64 = _value_and_grads(x, a, b, fused=False)
    for fused in (True, False):
        _, g32 = _value_and_grads(x.float(), a.float(), b.float(), fused=fused)
        for new, ref in zip(g32, g64):  # float32 round-off only, summed over 18432 elements
            assert float((new.double() - ref).abs().max()) <= 2e-5 * float(ref.abs().max())


def test_fused_is_one_graph_node_and_reference_is_not():
    x = torch.randn(3, 4, requires_grad=True)
    pau = PAU()
    y = pau(x)
    assert type(y.grad_fn).__name__ == "_SafePadeBBackward"
    with use_fused_pau(False):
        assert type(pau(x).grad_fn).__name__ != "_SafePadeBBackward"
    assert type(PAU(version="A")(x).grad_fn).__name__ != "_SafePadeBBackward"  # A: always the graph
    assert type(pau(x).grad_fn).__name__ == "_SafePadeBBackward"  # the switch is restored


def test_use_fused_pau_restores_on_exception():
    with pytest.raises(RuntimeError):
        with use_fused_pau(False):
            raise RuntimeError("boom")
    assert type(PAU()(torch.randn(2, requires_grad=True)).grad_fn).__name__ == "_SafePadeBBackward"


def test_fused_second_order_matches_reference():
    """create_graph through the fused node (recomputed graph) = the reference, incl. mixed terms."""
    x, a, b = _generic(5, 4, 6)
    x = x.view(-1)[3:].clone()  # off the kinks
    results = {}
    for fused in (True, False):
        xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
        with use_fused_pau(fused):
            y = pau_function(xr, ar, br)
            gx, ga, gb = torch.autograd.grad(y.pow(2).sum(), (xr, ar, br), create_graph=True)
            results[fused] = torch.autograd.grad(gx.pow(2).sum() + ga.sum() * gb.sum(), (xr, ar, br))
    for new, ref in zip(results[True], results[False]):
        torch.testing.assert_close(new, ref, rtol=1e-11, atol=1e-11 * float(ref.abs().max()))


def test_fused_gradients_survive_in_place_use_of_the_output():
    x, a, b = _generic(5, 4, 8)
    grads = {}
    for fused in (True, False):
        xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
        with use_fused_pau(fused):
            y = pau_function(xr, ar, br)
        y.mul_(3.0)  # the output is not saved for backward: in-place use is fine
        grads[fused] = torch.autograd.grad(y.sum(), (xr, ar, br))
    for new, ref in zip(grads[True], grads[False]):
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_low_precision_matches_reference(dtype):
    pau = PAU()
    x = (3 * torch.randn(64, generator=torch.Generator().manual_seed(0))).to(dtype)
    out = {}
    for fused in (True, False):
        pau.zero_grad()
        xr = x.clone().requires_grad_()
        with use_fused_pau(fused):
            y = pau(xr)
        y.float().sum().backward()
        out[fused] = (y, xr.grad, pau.numerator.grad.clone(), pau.denominator.grad.clone())
    for new, ref in zip(out[True], out[False]):
        assert new.dtype == ref.dtype
        torch.testing.assert_close(new.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_torch_func_transforms_fall_back_to_the_graph():
    x, a, b = _generic(5, 4, 9)
    g_func = torch.func.grad(lambda num: pau_function(x, num, b).sum())(a)  # classic Functions refuse
    ar = a.clone().requires_grad_()
    (g_fused,) = torch.autograd.grad(pau_function(x, ar, b).sum(), ar)
    torch.testing.assert_close(g_func, g_fused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(lambda v: pau_function(v, a, b))(x), pau_function(x, a, b))
