"""Choosing the codec quality at a byte budget: quantity against quality, on held-out data.

A lower JPEG quality stores more exemplars in the same bytes but blurs each one. Which side wins
depends on the budget and on what the exemplars are for. Two measurements share the rule here:

- :func:`choose_quality`, **the documented rule**: the highest quality whose held-out top-1 is
  within ``tolerance`` points of the best (lower qualities must pay for their blur with accuracy).
  Its scores come from a *pilot* (``benchmarks/quality_pilot.py``): the second phase trained once
  per quality from the same first phase, each final network scored on validation images (fresh
  draws of the synthetic generator; never the test set).
- :func:`probe_top1`, a cheap first-phase criterion in the spirit of MRDC's (features of the
  compressed memory under the current model; ``benchmarks/choose_quality.py``): a linear probe
  fitted on the memory each quality would keep and scored on held-out images. Measured on the
  synthetic set it is blind to quantity (2 raw exemplars per class score as well as 150 coded
  ones: docs/results.md, *Choosing the quality*), because what many exemplars buy is less forgetting in
  later phases, which no first-phase measurement sees. Kept as a tool for other data.

Both are pure (tensors or numbers in, numbers out).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-3,
    steps: int = 100,
) -> float:
    """Top-1 (%) on ``test_*`` of a multinomial logistic regression fitted on ``train_*``.

    Features are L2-normalised first; the fit is full-batch L-BFGS (deterministic) with an L2
    penalty ``weight_decay`` on the weights. Classes absent from ``train_labels`` can still be
    predicted (their row stays at the bias), as a memory that holds nothing of a class.
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError("features must be [n, d] with the same d for train and test, got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("one label per feature row")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("the probe needs at least one training and one test row")
    xtr = F.normalize(train_features.double(), dim=1)
    xte = F.normalize(test_features.double(), dim=1)
    ytr, yte = train_labels.long(), test_labels.long()
    num_classes = int(max(ytr.max(), yte.max())) + 1
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + weight_decay * (weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float(((xte @ weight + bias).argmax(1) == yte).double().mean())


def choose_quality(scores: Mapping[int, float], tolerance: float = 1.0) -> int:
    """The highest quality whose score (held-out top-1, %) is within ``tolerance`` of the best."""
    if not scores:
        raise ValueError("no quality was scored")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(scores.values())
    return max(q for q, s in scores.items() if s >= best - tolerance)
