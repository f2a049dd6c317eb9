"""Validation before anything is loaded: PyCIL keys, combinations, data roots (one error, every problem)."""

import pytest

from cim_plugin.config import ConfigError
from cim_plugin.pycil.checks import pycil_problems
from cim_plugin.pycil.hook import check_args

GOOD = {"prefix": "p", "dataset": "synthetic", "memory_size": 20, "shuffle": True, "init_cls": 5, "increment": 3,
        "model_name": "icarl", "convnet_type": "resnet18", "device": ["-1"], "seed": 1, "synthetic_num_classes": 8}


def test_a_good_config_passes():
    assert check_args(dict(GOOD)).model_name == "icarl"


def test_missing_and_mistyped_pycil_keys_are_named():
    args = {k: v for k, v in GOOD.items() if k != "memory_size"}
    args["shuffle"] = "yes"
    problems = pycil_problems(args, 8, 48)
    assert any("'memory_size' is missing" in p for p in problems)
    assert any("'shuffle' = 'yes'" in p for p in problems)


def test_foster_needs_its_own_keys():
    problems = pycil_problems({**GOOD, "model_name": "foster"}, 8, 48)
    for key in ("beta1", "boosting_epochs", "compression_epochs", "oofc"):
        assert any(f"'{key}' is missing" in p for p in problems), key


@pytest.mark.parametrize("change,fragment", [
    ({"init_cls": 3}, "at least 5 classes"),
    ({"init_cls": 9}, "only 8 classes"),
    ({"increment": 4}, "only 3 classes are left"),
    ({"convnet_type": "resnet32"}, "only at 32 px"),
    ({"fixed_memory": True}, "'memory_per_class' must be an integer"),
])
def test_combinations_that_cannot_work(change, fragment):
    problems = pycil_problems({**GOOD, **change}, 8, 48)
    assert any(fragment in p for p in problems), problems


def test_pau_needs_relu_modules():
    problems = pycil_problems({**GOOD, "convnet_type": "resnet32", "cim": True}, 8, 32)
    assert any("PAU" in p and "F.relu" in p for p in problems)
    assert not pycil_problems({**GOOD, "convnet_type": "resnet32", "cim": True, "cim_mask": "cam"}, 8, 32)


def test_data_root_problems_and_everything_in_one_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    args = {**GOOD, "dataset": "imagenet100", "data_root": str(tmp_path), "compress_ratio": 3, "init_cls": 2}
    with pytest.raises(ConfigError) as err:
        check_args(args)
    text = str(err.value)
    assert "'val' has no class folders" in text and "'compress_ratio' = 3" in text and "at least 5 classes" in text
    assert "only 1 classes" in text  # one class folder in train/
    with pytest.raises(ConfigError, match="no such folder"):
        check_args({**GOOD, "dataset": "imagenet100", "data_root": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="needs 'data_root'"):
        check_args({**GOOD, "dataset": "imagenet100"})
