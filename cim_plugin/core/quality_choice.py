"""Choosing the codec quality at a byte budget: quantity against quality, on held-out data.

A lower JPEG quality stores more exemplars in the same bytes but blurs each one. Which side wins
depends on the budget: where a class's budget already holds most of its images, more quantity buys
nothing and fidelity should win; where it holds a handful, quantity should. MRDC (ICLR 2022) weighs
the two with a DPP criterion on the features of the compressed set. The plugin's rule measures the
trade-off directly, with nothing but the first phase's model and its training images, and no
retraining (benchmark (f), ``benchmarks/choose_quality.py``):

1. each class's training images are split in two halves: *candidates* (what the memory may store)
   and *held-out* (what it should let the model recognise);
2. for each quality the candidates are coded, ranked by budget-consuming herding on the model's
   features of the decoded images (as the memory ranks them) and cut where the class's budget is
   spent: the memory that quality would keep;
3. a linear classifier (multinomial logistic regression on the model's L2-normalised features) is
   fitted on that memory and scored on the clean held-out images (:func:`probe_top1`);
4. the chosen quality is **the highest one whose held-out top-1 is within ``tolerance`` points of
   the best** (:func:`choose_quality`): lower qualities must pay for their blur with accuracy.

The functions here are pure (tensors in, numbers out); the benchmark script does the coding.
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
