import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from cim_plugin.core.herding import fit_prefix, herding_rank


def _reference_herding(vectors, m):
    """PyCIL's herding loop (models/base.py), restated: m picks, unit costs."""
    vectors = vectors.copy()
    idx = list(range(len(vectors)))
    class_mean = vectors.mean(0)
    chosen, picked = [], []
    for k in range(1, m + 1):
        s = np.sum(picked, axis=0) if picked else 0
        mu = (vectors + s) / k
        i = int(np.argmin(np.sqrt(((class_mean - mu) ** 2).sum(1))))
        chosen.append(idx[i]); picked.append(vectors[i])
        vectors = np.delete(vectors, i, 0); del idx[i]
    return chosen


def test_unit_costs_match_pycil_herding():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(40, 8))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ours = herding_rank(v, v.mean(0), budget=12)
    assert list(ours) == _reference_herding(v, 12)


def test_cheaper_exemplars_mean_more_picks_within_budget():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(60, 4))
    costs = rng.uniform(0.3, 0.7, size=60)
    ranked = herding_rank(v, v.mean(0), costs, budget=10)
    assert costs[ranked].sum() <= 10 + 1e-9
    assert len(ranked) > 10
    # stops at the first pick that would not fit: the next herding pick must exceed the budget
    longer = herding_rank(v, v.mean(0), costs, budget=None)
    assert list(longer[: len(ranked)]) == list(ranked)
    assert costs[longer[: len(ranked) + 1]].sum() > 10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.05, 1.0), min_size=0, max_size=50), st.floats(0, 30))
def test_fit_prefix_is_the_longest_fitting_prefix(costs, budget):
    c = np.array(costs)
    k = fit_prefix(c, budget)
    assert c[:k].sum() <= budget + 1e-9
    assert k == len(c) or c[: k + 1].sum() > budget


def test_bad_inputs_are_refused():
    import pytest
    with pytest.raises(ValueError, match="costs"):
        herding_rank(torch.zeros(3, 2), torch.zeros(2), costs=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="target"):
        herding_rank(torch.zeros(3, 2), torch.zeros(5))
