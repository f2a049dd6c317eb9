"""Padé activation units (PAU, Molina et al., ICLR 2020) in plain torch.

The CIM mask branch (../shared/docs/method.md §3) is the CIL network with every ReLU replaced by a
"safe" PAU

    P(x) = (a_0 + a_1 x + … + a_m x^m) / Q(x),      m = 5, n = 4 by default,

with one of the two safe denominators of the ``rational-activations`` package (which the official
code used but which cannot be installed on this stack):

- ``version="B"`` (method.md's formula, the default):  Q(x) = 1 + |b_1 x + … + b_n x^n|;
- ``version="A"`` (the package's default, hence the official code's):  Q(x) = 1 + |b_1 x| + … + |b_n x^n|.

Both are ≥ 1, so P has no poles. Each PAU is initialised to a ReLU fit whose denominator is even
with non-negative coefficients (b_1 = b_3 = 0, b_2, b_4 ≥ 0); for such coefficients both versions
are the same function, so one set of constants serves both.

Numerics: polynomials are evaluated by Horner's scheme in float32 at least (fp16/bf16 inputs and
coefficients are upcast, the result is cast back to the input dtype; float64 stays float64). For
|x| ≤ 1e3 every intermediate (x^5 ≈ 1e15, Q ≈ 1e12) and every gradient term is far inside the
float32 range, so forward and backward are finite. An fp16 result is clamped to ±65504 before the
cast instead of turning into ±inf (large coefficients could otherwise overflow fp16). Beyond the
fitted interval a (5, 4) PAU at the ReLU fit grows like ``a_5/b_4 · x ≈ x/2`` on both sides (a
rational function cannot have different slopes at ±∞): it approximates ReLU on [-3, 3] only.

Implementation: version B (the default) runs as one autograd node (:class:`_SafePadeB`) with a
hand-written first-order backward — 2–3× faster forward + backward on CPU than the per-op
graph of ~20 nodes — and falls back to that graph to differentiate its own backward
(``create_graph=True``) and under ``torch.func`` transforms. Version A always uses the graph.
:func:`use_fused_pau` switches version B back to the reference implementation (benchmarks, tests);
both agree to float round-off (fused Horner steps round once where the reference rounds twice).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "PAU",
    "PadeFit",
    "pau_function",
    "use_fused_pau",
    "fit_relu_coefficients",
    "pade_max_error",
    "RELU_INIT_NUMERATOR",
    "RELU_INIT_DENOMINATOR",
    "DEFAULT_INIT_RANGE",
    "RELU_FIT_MAX_ERROR",
]

# From ``fit_relu_coefficients()`` with its defaults (num_degree=5, den_degree=4, lo=-3.0, hi=3.0,
# num_points=2001, iterations=40, lawson_exponent=0.5, even_denominator=True), printed with repr().
# tests/test_pau.py re-runs the fit and checks these to 1e-6.
RELU_INIT_NUMERATOR: tuple[float, ...] = (
    0.012619911427883731,
    0.4999999999999955,
    2.8060113974442826,
    4.57546876946919,
    2.6100038567033184,
    0.4678122183551695,
)
RELU_INIT_DENOMINATOR: tuple[float, ...] = (
    0.0,
    9.150937538938383,
    0.0,
    0.9356244367103397,
)
# max |P(x) - relu(x)| of the constants above on 600001 evenly spaced points of [-3, 3], float64
# (``pade_max_error(RELU_INIT_NUMERATOR, RELU_INIT_DENOMINATOR)``): ≈ 0.0129, the error nearly
# equioscillates (P(0) = a_0 ≈ 0.0126); 100 iterations instead of 40 would reach ≈ 0.0128.
RELU_FIT_MAX_ERROR: float = 0.012907574277452167


class PadeFit(NamedTuple):
    """Result of :func:`fit_relu_coefficients` (coefficients in ascending powers)."""

    numerator: tuple[float, ...]
    denominator: tuple[float, ...]
    max_error: float  # on the fit's own grid


def _horner_np(coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        out = out * x + c
    return out


def _safe_pade_np(numerator, denominator, x: np.ndarray, version: str = "B") -> np.ndarray:
    a = np.asarray(numerator, dtype=np.float64)
    b = np.concatenate([[0.0], np.asarray(denominator, dtype=np.float64)])
    if version == "B":
        q = 1.0 + np.abs(_horner_np(b, x))
    elif version == "A":
        q = 1.0 + _horner_np(np.abs(b), np.abs(x))
    else:
        raise ValueError(f"PAU version must be 'A' or 'B', got {version!r}")
    return _horner_np(a, x) / q


def _lstsq_householder(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares by Householder QR with elementwise numpy only.

    ``np.linalg.lstsq`` goes through a threaded BLAS/LAPACK: on a busy 2-core machine that was 60×
    slower than this loop, and its last bits may depend on the thread count. Tall, thin problems
    (2001 × 8 here) need nothing faster.
    """
    a = np.array(a, dtype=np.float64, copy=True)
    y = np.array(y, dtype=np.float64, copy=True)
    rows, cols = a.shape
    for j in range(cols):
        col = a[j:, j]
        norm = float(np.sqrt((col * col).sum()))
        if norm == 0.0:
            continue
        v = col.copy()
        v[0] += norm if v[0] >= 0 else -norm
        v /= np.sqrt((v * v).sum())
        a[j:, j:] -= 2.0 * v[:, None] * (v[:, None] * a[j:, j:]).sum(axis=0)[None, :]
        y[j:] -= 2.0 * v * (v * y[j:]).sum()
    sol = np.zeros(cols)
    for j in range(cols - 1, -1, -1):
        if a[j, j] == 0.0:
            raise np.linalg.LinAlgError("rank-deficient Padé fit; lower the degrees or add points")
        sol[j] = (y[j] - (a[j, j + 1 : cols] * sol[j + 1 :]).sum()) / a[j, j]
    return sol


def pade_max_error(
    numerator=RELU_INIT_NUMERATOR,
    denominator=RELU_INIT_DENOMINATOR,
    lo: float = -3.0,
    hi: float = 3.0,
    num_points: int = 600001,
    version: str = "B",
) -> float:
    """max |P(x) − relu(x)| over ``num_points`` evenly spaced points of [lo, hi], in float64."""
    x = np.linspace(lo, hi, num_points)
    return float(np.abs(_safe_pade_np(numerator, denominator, x, version) - np.maximum(x, 0.0)).max())


def fit_relu_coefficients(
    num_degree: int = 5,
    den_degree: int = 4,
    lo: float = -3.0,
    hi: float = 3.0,
    num_points: int = 2001,
    iterations: int = 40,
    lawson_exponent: float = 0.5,
    even_denominator: bool = True,
) -> PadeFit:
    """Fit a safe PAU to ReLU on [lo, hi]; deterministic (float64 numpy, fixed iteration count).

    Method: a linearised Padé fit, iterated. On ``num_points`` evenly spaced x_i with y_i = relu(x_i),
    each iteration solves the weighted linear least-squares problem

        min_{a, b}  Σ_i (w_i / q_i)^2 · (N(x_i) − y_i·D(x_i) − y_i)^2,     D(x) = Σ_k b_k x^k,

    where q_i = 1 + |D_prev(x_i)| is the previous iteration's safe denominator (Sanathanan–Koerner
    reweighting, so the linearised residual approximates the true residual P − y) and the weights
    w_i are multiplied by |P(x_i) − y_i|^lawson_exponent and renormalised (a Lawson-style update
    that drives the fit from least squares towards minimax). The iterate with the smallest max
    error of the *safe* form on the grid is returned. With ``even_denominator`` the odd b_k are
    fixed at 0: ReLU = (x + |x|)/2 and the best rational fit of |x| is even, so nothing is lost, and
    the fitted b_2, b_4 come out positive, which makes versions A and B of the PAU coincide.

    The defaults give max error ≈ 0.0129 on [-3, 3] in < 0.1 s (see RELU_FIT_MAX_ERROR). No BLAS is
    used (:func:`_lstsq_householder`), so the result does not depend on a BLAS thread count.
    """
    if num_degree < 1 or den_degree < 1:
        raise ValueError(f"PAU degrees must be ≥ 1, got ({num_degree}, {den_degree})")
    if not hi > lo:
        raise ValueError(f"need lo < hi, got [{lo}, {hi}]")
    if num_points < num_degree + den_degree + 2 or iterations < 1:
        raise ValueError("need num_points > num_degree + den_degree + 1 and iterations ≥ 1")
    x = np.linspace(lo, hi, num_points, dtype=np.float64)
    y = np.maximum(x, 0.0)
    free = np.array([not even_denominator or k % 2 == 0 for k in range(1, den_degree + 1)])
    design = np.hstack(
        [
            np.vander(x, num_degree + 1, increasing=True),
            (-y[:, None] * np.vander(x, den_degree + 1, increasing=True)[:, 1:])[:, free],
        ]
    )
    w = np.ones_like(x)
    q = np.ones_like(x)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(iterations):
        scale = w / q
        sol = _lstsq_householder(design * scale[:, None], y * scale)
        a = sol[: num_degree + 1]
        b = np.zeros(den_degree)
        b[free] = sol[num_degree + 1 :]
        q = 1.0 + np.abs(_horner_np(np.concatenate([[0.0], b]), x))
        err = _horner_np(a, x) / q - y
        max_err = float(np.abs(err).max())
        if best is None or max_err < best[0]:
            best = (max_err, a.copy(), b.copy())
        w = w * np.abs(err) ** lawson_exponent
        w = np.maximum(w / w.max(), 1e-12)
    assert best is not None
    max_err, a, b = best
    return PadeFit(tuple(float(v) for v in a), tuple(float(v) for v in b), max_err)


DEFAULT_INIT_RANGE = 3.0  # the official code's ReLU fit interval [-3, 3] (what RELU_INIT_* fit)


@functools.lru_cache(maxsize=None)
def _relu_init(num_degree: int, den_degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if (num_degree, den_degree) == (len(RELU_INIT_NUMERATOR) - 1, len(RELU_INIT_DENOMINATOR)):
        return RELU_INIT_NUMERATOR, RELU_INIT_DENOMINATOR
    fit = fit_relu_coefficients(num_degree, den_degree)
    return fit.numerator, fit.denominator


def _finish(out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if out_dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        out = out.clamp(-limit, limit)
    return out.to(out_dtype) if out_dtype.is_floating_point else out


def _pau_b_inplace(xc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Version B without autograd, reference implementation (``use_fused_pau(False)``): the same
    operations in the same order as the autograd graph path (bit-identical results), on two
    buffers updated in place instead of ~20 temporaries."""
    num = a[-1] * xc
    num.add_(a[-2])
    for k in range(a.numel() - 3, -1, -1):
        num.mul_(xc).add_(a[k])
    den = b[-1] * xc
    for k in range(b.numel() - 2, -1, -1):
        den.add_(b[k]).mul_(xc)
    den.abs_().add_(1.0)
    return _finish(num.div_(den), out_dtype)


# ------------------------------------------------------------------------------------------------
# fused version B: one autograd node per call, hand-written first-order backward
# ------------------------------------------------------------------------------------------------

_FUSED = True


@contextlib.contextmanager
def use_fused_pau(enabled: bool = True) -> Iterator[None]:
    """Within the block, version-B PAUs run on the fused implementation (``True``, the default
    outside any block) or on the reference one (``False``: per-op autograd graph, and the in-place
    no-grad path of the same operations). Both compute the same function and gradients up to float
    round-off; the switch exists for benchmarks and tests. Not thread-local."""
    global _FUSED
    before = _FUSED
    _FUSED = bool(enabled)
    try:
        yield
    finally:
        _FUSED = before


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, …) is running: the fused node is a
    classic ``autograd.Function`` (it saves intermediates), which those transforms refuse."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - private API moved: assume no transform
        return False


def _horner(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_k c[k]·x^k (``c`` 1-D, ascending) by Horner's scheme into one new buffer shaped like ``x``:
    one fused multiply-add pass (``addcmul`` with ``out=``) per coefficient after the first two."""
    if c.numel() == 1:
        return torch.empty_like(x).fill_(c[0])
    out = torch.addcmul(c[-2], x, c[-1])
    for k in range(c.numel() - 3, -1, -1):
        torch.addcmul(c[k], out, x, out=out)
    return out


def _pade_b_parts(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N(x), D(x)) with D(x) = b_1 x + … + b_n x^n, each in a new buffer."""
    den = _horner(b, x).mul_(x)
    return _horner(a, x), den


def _pade_b_nograd(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fused forward without a graph: the very operations of :class:`_SafePadeB`'s forward
    (bit-identical values), on two buffers."""
    num, den = _pade_b_parts(x, a, b)
    return num.div_(den.abs_().add_(1.0))


def _power_sums(t: torch.Tensor, x: torch.Tensor, count: int, first_power: int) -> torch.Tensor:
    """``[Σ t·x^k for k = first_power … first_power + count − 1]``; overwrites ``t`` (owned)."""
    for _ in range(first_power):
        t.mul_(x)
    sums = [t.sum()]
    for _ in range(count - 1):
        sums.append(t.mul_(x).sum())
    return torch.stack(sums)


def _pade_graph(xc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, version: str) -> torch.Tensor:
    """The PAU as a graph of elementary differentiable ops (any order, either version)."""
    num = a[-1] * xc + a[-2]  # Horner, highest power first
    for k in range(a.numel() - 3, -1, -1):
        num = num * xc + a[k]

    if version == "B":  # 1 + |b_1 x + … + b_n x^n|
        den = b[-1] * xc
        for k in range(b.numel() - 2, -1, -1):
            den = (den + b[k]) * xc
        den = 1.0 + den.abs()
    elif version == "A":  # 1 + Σ |b_k| |x|^k, Horner in |x|
        ax = xc.abs()
        # |b| with the subgradient +1 at b = 0 (torch's abs has 0 there): the ReLU init has
        # b_1 = b_3 = 0 exactly, which would otherwise never receive a gradient.
        bb = torch.where(b < 0, -b, b)
        den = bb[-1] * ax
        for k in range(bb.numel() - 2, -1, -1):
            den = (den + bb[k]) * ax
        den = 1.0 + den
    else:
        raise ValueError(f"PAU version must be 'A' or 'B', got {version!r}")
    return num / den


class _SafePadeB(torch.autograd.Function):
    """P(x) = N(x) / Q(x), Q = 1 + |D(x)|, D(x) = b_1 x + … + b_n x^n, as a single autograd node.

    Forward: two Horner evaluations and a division, ~14 elementwise passes over two buffers,
    instead of ~20 graph nodes each with its own output and saved temporaries. It saves x, Q and
    S = sgn(D)·P (sgn(0) = 0, the subgradient torch's ``abs`` uses, so the same as the graph path).
    First-order backward, with r = g/Q and w = r·S = g·N·sgn(D)/Q²:

        ∂/∂x   = r·N'(x) − w·D'(x)
        ∂/∂a_k = Σ r·x^k               (k = 0 … m)
        ∂/∂b_k = −Σ w·x^k              (k = 1 … n)

    N' and D' by Horner on the coefficients k·a_k and k·b_k; each power sum by multiplying one
    buffer by x in place and summing (``torch.sum``, as the graph path's reductions). Only the
    gradients in ``needs_input_grad`` are computed (the first PAU of a branch whose θ is detached
    needs none for x).

    First order is all the CIM mask step asks of the branch: θ is read detached there, so the
    inner ``create_graph=True`` gradient w.r.t. θ never runs this backward, and the final gradient
    w.r.t. φ runs it once, without a graph. Higher orders still work: when the backward is itself
    recorded (``create_graph=True``) it recomputes the PAU from its inputs as an ordinary graph
    (:func:`_pade_graph`) and differentiates that, so double backward is exact (and as slow as the
    reference); the saved intermediates never enter a higher-order graph.

    Not compiled: ``torch.compile`` (inductor, CPU) of these two kernels ran them another 3× (forward)
    and 9× (backward) faster on a 16×64×48×48 input, but its first call took ~38 s on a 2-core
    machine — more than it saves over the few dozen mask steps of a demo run.
    """

    @staticmethod
    def forward(ctx, x, a, b):
        num, den = _pade_b_parts(x, a, b)
        q = torch.abs(den).add_(1.0)
        out = num.div_(q)
        need_x, _, need_b = ctx.needs_input_grad[:3]
        s = den.sign_().mul_(out) if need_x or need_b else None  # sgn(D)·P, in D's buffer
        ctx.save_for_backward(x, a, b, q, s)
        return out

    @staticmethod
    def backward(ctx, g):
        x, a, b, q, s = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputed graph
            inputs = [t for t, need in zip((x, a, b), (need_x, need_a, need_b)) if need]
            with torch.enable_grad():
                out = _pade_graph(x, a, b, "B")
            grads = iter(torch.autograd.grad(out, inputs, g, create_graph=True, allow_unused=True))
            return tuple(next(grads) if need else None for need in (need_x, need_a, need_b))
        gx = ga = gb = None
        r = torch.div(g, q)
        w = torch.mul(r, s) if need_x or need_b else None
        if need_x:
            m, n = a.numel() - 1, b.numel()
            dnum = _horner(a[1:] * torch.arange(1, m + 1, dtype=a.dtype, device=a.device), x)
            dden = _horner(b * torch.arange(1, n + 1, dtype=b.dtype, device=b.device), x)
            gx = dnum.mul_(r).addcmul_(w, dden, value=-1.0)
        if need_a:
            ga = _power_sums(r, x, a.numel(), 0)
        if need_b:
            gb = _power_sums(w, x, b.numel(), 1).neg_()
        return gx, ga, gb


def pau_function(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, version: str = "B"
) -> torch.Tensor:
    """The safe PAU as a function of its input and coefficients (what :class:`PAU` calls).

    Computes in ``promote_types(x.dtype, float32)`` (fp16/bf16 upcast, float64 kept), returns
    ``x``'s dtype (fp16 results clamped to ±65504). Differentiable to any order in all three
    (version B: one fused node for first order, the graph for higher orders, see the module doc).
    """
    out_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    xc = x.to(compute)
    a = numerator.to(compute)
    b = denominator.to(compute)
    if a.ndim != 1 or b.ndim != 1 or a.numel() < 2 or b.numel() < 1:
        raise ValueError(
            f"need 1-D numerator (≥ 2) and denominator (≥ 1), got {tuple(a.shape)}, {tuple(b.shape)}"
        )

    if version not in ("A", "B"):
        raise ValueError(f"PAU version must be 'A' or 'B', got {version!r}")
    graph = torch.is_grad_enabled() and (xc.requires_grad or a.requires_grad or b.requires_grad)
    if version == "B" and _FUSED and not _functorch_active():
        out = _SafePadeB.apply(xc, a, b) if graph else _pade_b_nograd(xc, a, b)
        return _finish(out, out_dtype)
    if version == "B" and not graph:
        return _pau_b_inplace(xc, a, b, out_dtype)  # no graph to keep: two buffers, updated in place
    return _finish(_pade_graph(xc, a, b, version), out_dtype)


class PAU(nn.Module):
    """Safe Padé activation unit with its own ``numerator`` [m+1] and ``denominator`` [n] parameters.

    One coefficient set per module (i.e. per activation site), initialised to the ReLU fit
    (``RELU_INIT_*`` for the default degrees (5, 4), else a fresh :func:`fit_relu_coefficients`),
    both on [-3, 3]. ``init_range`` r ≠ 3 makes the unit follow ReLU on [-r, r] instead, as
    ``s · P(x / s)`` with s = r / 3 and the *same* coefficients: ReLU is positively homogeneous, so
    this is exactly the fit on [-r, r], while the parameters keep the scale the optimiser of φ is
    tuned for. (Fitting [-r, r] directly shrinks the high-order coefficients by r^k: one Adam step
    of lr 0.01 then changes them by orders of magnitude, and at r = 10 the first mask step already
    made the branch overflow to NaN.) ``version`` picks the safe denominator (module docstring). Elementwise, not in place. Given
    ``*_init`` values are stored as float32 parameters (like any module; ``.double()`` converts).
    """

    input_scale: float = 1.0  # s in s · P(x / s); the class value serves PAUs pickled before init_range

    def __init__(
        self,
        num_degree: int = 5,
        den_degree: int = 4,
        version: str = "B",
        numerator_init=None,
        denominator_init=None,
        init_range: float = DEFAULT_INIT_RANGE,
    ):
        super().__init__()
        if version not in ("A", "B"):
            raise ValueError(f"PAU version must be 'A' or 'B', got {version!r}")
        if not float(init_range) > 0:
            raise ValueError(f"PAU init_range must be > 0, got {init_range!r}")
        self.version = version
        self.input_scale = float(init_range) / DEFAULT_INIT_RANGE
        if numerator_init is None or denominator_init is None:
            num0, den0 = _relu_init(int(num_degree), int(den_degree))
            numerator_init = num0 if numerator_init is None else numerator_init
            denominator_init = den0 if denominator_init is None else denominator_init
        num = torch.as_tensor(numerator_init, dtype=torch.float32).detach().clone().reshape(-1)
        den = torch.as_tensor(denominator_init, dtype=torch.float32).detach().clone().reshape(-1)
        if num.numel() != num_degree + 1 or den.numel() != den_degree:
            raise ValueError(
                f"PAU({num_degree}, {den_degree}) needs {num_degree + 1} numerator and {den_degree} "
                f"denominator coefficients, got {num.numel()} and {den.numel()}"
            )
        self.numerator = nn.Parameter(num)
        self.denominator = nn.Parameter(den)

    @property
    def degrees(self) -> tuple[int, int]:
        return self.numerator.numel() - 1, self.denominator.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_scale
        if s == 1.0:
            return pau_function(x, self.numerator, self.denominator, self.version)
        return pau_function(x / s, self.numerator, self.denominator, self.version) * s

    def extra_repr(self) -> str:
        m, n = self.degrees
        scale = "" if self.input_scale == 1.0 else f", input_scale={self.input_scale:g}"
        return f"degrees=({m}, {n}), version={self.version!r}{scale}"
