"""Budget-consuming herding: a selection strategy that returns a *ranked* list.

PyCIL's herding picks, one at a time, the candidate whose addition brings the running mean of the
chosen features closest to the class mean. With compressed exemplars each pick consumes its cost
r_k (in full-exemplar units) of the class budget m, and picking stops when the next pick would
exceed m (../shared/docs/method.md §2). Because the result is a ranking, shrinking a class's
budget later is cutting the list with `fit_prefix` — the same cumulative rule.
"""

from __future__ import annotations

import numpy as np
import torch

#: Slack for float round-off when summing costs against an integer budget.
COST_TOLERANCE = 1e-9


def fit_prefix(costs: np.ndarray, budget: float) -> int:
    """Length of the longest prefix of ``costs`` whose sum stays within ``budget``."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.size == 0 or budget <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(costs), budget + COST_TOLERANCE, side="right"))


def herding_rank(
    candidates: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    costs: torch.Tensor | np.ndarray | None = None,
    budget: float | None = None,
) -> np.ndarray:
    """Rank candidates by herding until the budget is consumed.

    candidates: ``[n, d]`` (L2-normalised) features of what would be stored.
    target: ``[d]`` the mean to approximate (mean of the normalised clean features).
    costs: ``[n]`` cost of each candidate in full-exemplar units (default 1 each).
    budget: units available (default: rank every candidate).
    Returns the chosen indices in pick order; their cumulative cost never exceeds ``budget``.
    Each step is one vectorised distance computation over the remaining candidates.
    """
    cand = torch.as_tensor(candidates, dtype=torch.float64)
    if cand.ndim != 2:
        raise ValueError(f"candidates must be [n, d], got shape {tuple(cand.shape)}")
    n = cand.shape[0]
    tgt = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
    if tgt.shape[0] != cand.shape[1]:
        raise ValueError(f"target has {tgt.shape[0]} dims, candidates have {cand.shape[1]}")
    cost = torch.ones(n, dtype=torch.float64) if costs is None else torch.as_tensor(costs, dtype=torch.float64)
    if cost.shape != (n,):
        raise ValueError(f"costs must have shape ({n},), got {tuple(cost.shape)}")
    if bool((cost <= 0).any()) or not bool(torch.isfinite(cost).all()):
        raise ValueError("costs must be finite and > 0")
    limit = float("inf") if budget is None else float(budget)

    chosen: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros_like(tgt)
    used = 0.0
    for k in range(1, n + 1):
        dist = ((tgt - (running + cand) / k) ** 2).sum(dim=1)
        dist[taken] = float("inf")
        i = int(torch.argmin(dist))
        if used + float(cost[i]) > limit + COST_TOLERANCE:
            break
        chosen.append(i)
        taken[i] = True
        running += cand[i]
        used += float(cost[i])
    return np.asarray(chosen, dtype=np.int64)
