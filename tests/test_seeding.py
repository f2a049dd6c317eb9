"""Real seeding: the run's seed drives python random, numpy and torch; determinism on request."""

import logging
import os
import random

import numpy as np
import pytest
import torch

from cim_plugin.config import CIMConfig, ConfigError
from cim_plugin.pycil import hook
from cim_plugin.seeding import deterministic_state, restore_deterministic, seed_everything


def draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 10**6, (1,)).item())


@pytest.fixture
def keep_state():
    """Restore the global RNGs and deterministic flags the tests change."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), deterministic_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    restore_deterministic(saved[3])


def test_same_seed_same_draws_different_seed_different(keep_state):
    seed_everything(1993)
    a = draws()
    seed_everything(1993)
    assert draws() == a
    seed_everything(1994)
    b = draws()
    assert all(x != y for x, y in zip(a, b))


def test_large_and_negative_seeds(keep_state):
    done = seed_everything(2**32 + 5)
    assert done["numpy"] == 5
    seed_everything(-3)  # python and torch take it; numpy gets it modulo 2**32


def test_bad_seed_type_is_refused():
    with pytest.raises(TypeError):
        seed_everything(True)
    with pytest.raises(TypeError):
        seed_everything("1993")


def test_deterministic_sets_the_torch_flags(keep_state, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    seed_everything(1, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_not_deterministic_leaves_the_flags(keep_state):
    torch.use_deterministic_algorithms(False)
    seed_everything(1)
    assert not torch.are_deterministic_algorithms_enabled()


def args(**kw):
    return {"cim": False, "model_name": "icarl", "dataset": "cifar100", "seed": 7, **kw}


def test_keys_are_validated():
    cfg = CIMConfig.from_args(args())
    assert (cfg.cim_seed, cfg.deterministic, cfg.cim_check_images) == (True, False, False)
    with pytest.raises(ConfigError) as err:
        CIMConfig.from_args(args(cim_seed=1, deterministic="yes", cim_check_images=None))
    text = str(err.value)
    assert "'cim_seed' = 1" in text and "'deterministic' = 'yes'" in text and "'cim_check_images' = None" in text


def test_before_run_seeds_with_the_runs_seed(keep_state, caplog):
    with caplog.at_level(logging.INFO, logger="cim_plugin.seeding"):
        hook.seed_run(args(seed=7), CIMConfig.from_args(args(seed=7)))
    a = draws()
    torch.manual_seed(1)  # what PyCIL's trainer did before
    hook.seed_run(args(seed=7), CIMConfig.from_args(args(seed=7)))
    assert draws() == a
    assert any("with 7" in r.getMessage() for r in caplog.records)


def test_cim_seed_false_leaves_the_generators(keep_state):
    torch.manual_seed(1)
    expected = torch.rand(2).tolist()
    torch.manual_seed(1)
    hook.seed_run(args(seed=7, cim_seed=False), CIMConfig.from_args(args(seed=7, cim_seed=False)))
    assert torch.rand(2).tolist() == expected


def test_deterministic_without_seeding(keep_state):
    torch.use_deterministic_algorithms(False)
    hook.seed_run(args(cim_seed=False, deterministic=True), CIMConfig.from_args(args(cim_seed=False, deterministic=True)))
    assert torch.are_deterministic_algorithms_enabled()


def test_cim_later_seed_reseeds_before_the_second_phase_only(keep_state):
    from cim_plugin.pycil.first_phase import FirstPhaseMixin

    class Base:
        def __init__(self, task):
            self._cur_task = task

        def incremental_train(self, data_manager):
            return torch.rand(3)

    class Learner(FirstPhaseMixin, Base):
        pass

    def draws(later_seed, task=0):
        torch.manual_seed(123)
        torch.rand(int(later_seed or 0) % 7 + 1)  # each run has drawn a different amount so far
        lrn = Learner(task)
        lrn._first_phase_setup({}, None, later_seed)
        return lrn.incremental_train(None)

    assert torch.equal(draws(5), draws(5)) and not torch.equal(draws(5), draws(6))
    assert not torch.equal(draws(None), draws(5))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lrn = Learner(1)  # a later phase: no reseeding
    lrn._first_phase_setup({}, None, 5)
    assert torch.equal(lrn.incremental_train(None), expected)


def test_isolated_rng_leaves_every_generator_where_it_was(keep_state):
    from cim_plugin.seeding import isolated_rng

    seed_everything(7)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(7)
    with isolated_rng():
        random.random(), np.random.rand(5), torch.rand(9)  # the block's own draws
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
