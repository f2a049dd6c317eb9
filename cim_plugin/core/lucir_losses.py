"""LUCIR's loss pieces (Hou et al., CVPR 2019), pure functions of tensors, no PyCIL imports.

The plugin's LUCIR learner (pycil/lucir.py) adds them to the cross-entropy on the cosine logits
from the second task on: ``less_forget_weight`` × ``less_forget_loss`` + ``lambda_mr`` ×
``margin_ranking_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def less_forget_weight(lambda_base: float, n_old: int, n_new: int) -> float:
    """lambda = lambda_base * sqrt(|old classes| / |new classes|) (the paper's adaptive weight)."""
    return float(lambda_base) * math.sqrt(n_old / n_new)


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(f_new, f_old) (CosineEmbeddingLoss with target 1); the old side is detached."""
    return (1.0 - F.cosine_similarity(features, old_features.detach(), dim=1, eps=1e-8)).mean()


def margin_ranking_loss(
    cosines: torch.Tensor, targets: torch.Tensor, n_old: int, K: int, margin: float
) -> torch.Tensor:
    """Margin ranking loss on the old-class samples of a batch.

    ``cosines`` ``[B, C]`` are the unscaled cosine scores (old classes first). For every sample
    whose label is an old class, its ground-truth score must exceed each of the K largest
    new-class scores by ``margin``: mean over those samples x K of max(0, m - (s_gt - s_new)).
    Zero (with a graph) when the batch holds no old-class sample.
    """
    old = targets < n_old
    if n_old <= 0 or n_old >= cosines.shape[1] or not bool(old.any()):
        return cosines.sum() * 0.0
    k = min(int(K), cosines.shape[1] - n_old)
    gt = cosines[old].gather(1, targets[old].view(-1, 1))  # [H, 1]
    hardest = cosines[old, n_old:].topk(k, dim=1).values  # [H, k]
    return F.relu(margin - (gt - hardest)).mean()
