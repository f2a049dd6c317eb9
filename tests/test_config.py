import subprocess
import sys

import pytest

from cim_plugin.config import BILEVEL_MODES, MASK_SOURCES, CIMConfig, ConfigError, validate_args
from cim_plugin.core.bilevel import BilevelSettings
from cim_plugin.core.masks import make_mask_source


def test_defaults_are_the_papers():
    cfg = CIMConfig.from_args({"cim": True, "model_name": "foster"})
    assert (cfg.compress_ratio, cfg.mask_threshold, cfg.cam_update_interval) == (4.0, 0.6, 40)
    assert (cfg.randombbxblur_prob_incre, cfg.cam_batch_size, cfg.cim_mask) == (0.1, 16, "pau")
    assert (cfg.meta_batch_size, cfg.num_meta_iters_per_cls, cfg.lr_ratio, cfg.phi_lr) == (16, 0.5, 0.1, 0.01)
    assert (cfg.max_phi_grad_norm, cfg.div_coef, cfg.reg_coef, cfg.cim_bilevel) == (1.0, 0.2, 0.1, "bilevel")
    assert cfg.downsample_factor == 2


def test_values_are_read_from_args():
    cfg = CIMConfig.from_args({"cim": True, "model_name": "DER", "compress_ratio": 16, "cim_mask": "random", "seed": 7})
    assert cfg.compress_ratio == 16.0 and cfg.downsample_factor == 4
    assert cfg.cim_mask == "random" and cfg.model_name == "der" and cfg.seed == 7


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("compress_ratio", 3.0, "square of an integer"),
        ("compress_ratio", "4", "square of an integer"),
        ("mask_threshold", 1.0, "< 1.0"),
        ("mask_threshold", -0.1, ">= 0.0"),
        ("cam_update_interval", 0, "integer >= 1"),
        ("cam_update_interval", 2.5, "integer"),
        ("cim", "yes", "true or false"),
        ("cim_mask", "pixels", '"cam"'),
        ("cim_bilevel", "half", '"joint"'),
        ("meta_batch_size", 1, "integer >= 2"),
        ("randombbxblur_prob_incre", 1.5, "<= 1.0"),
        ("epochs", -1, "integer >= 0"),
        ("milestones", [10, "x"], "list of integers"),
    ],
)
def test_bad_values_name_key_value_and_rule(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        CIMConfig.from_args({"cim": True, "model_name": "icarl", key: value})
    text = str(err.value)
    assert f"'{key}'" in text and repr(value) in text and fragment in text


def test_unknown_plugin_key_and_near_miss_are_errors():
    problems = validate_args({"cim": True, "model_name": "icarl", "cim_maks": "cam", "compres_ratio": 4})
    assert any("'cim_maks'" in p and "did you mean 'cim_mask'" in p for p in problems)
    assert any("'compres_ratio'" in p and "did you mean 'compress_ratio'" in p for p in problems)


def test_pycil_keys_are_not_flagged():
    args = {"prefix": "x", "dataset": "cifar100", "memory_size": 2000, "init_cls": 10, "increment": 10,
            "model_name": "foster", "convnet_type": "resnet32", "device": ["0"], "seed": [1], "beta1": 0.9,
            "boosting_epochs": 1, "compression_epochs": 1, "init_epochs": 1, "lr": 0.1}
    assert validate_args(args) == []


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        CIMConfig.from_args({"cim": True, "model_name": "bic", "compress_ratio": 2, "mask_threshold": 7})
    assert len(err.value.problems) == 3
    assert "model_name" in str(err.value) and "icarl, der, foster" in str(err.value)


def test_cim_off_with_any_learner_is_fine():
    assert CIMConfig.from_args({"model_name": "bic"}).cim is False


def test_lucir_keys_are_checked_and_lucir_takes_the_plugin():
    problems = validate_args({"model_name": "lucir", "K": 0, "lambda_base": -1, "margin": "0.5",
                              "lambda_mr": 1, "imprint_weights": "yes"})
    assert len(problems) == 4
    assert all(any(f"'{k}'" in p for p in problems) for k in ("K", "lambda_base", "margin", "imprint_weights"))
    ok = {"cim": True, "model_name": "lucir", "convnet_type": "cosine_resnet18", "K": 2, "lambda_base": 5,
          "margin": 0.5, "lambda_mr": 1.0, "imprint_weights": True, "init_epoch": 90, "lrate": 0.1}
    assert validate_args(ok) == []


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("data_root", "", "non-empty path"),
        ("synthetic_num_classes", 1, "integer >= 2"),
        ("synthetic_image_size", 20, "integer in [32, 256]"),
        ("synthetic_train_per_class", 1.5, "integer >= 2"),
        ("synthetic_test_per_class", 0, "integer >= 1"),
        ("synthetic_seed", -1, "integer >= 0"),
    ],
)
def test_dataset_keys_are_validated_like_the_others(key, value, fragment):
    problems = validate_args({"model_name": "icarl", key: value})
    assert len(problems) == 1 and f"'{key}' = {value!r}" in problems[0] and fragment in problems[0]


def test_config_and_the_command_line_import_no_torch():
    """The key definitions use the core's torch-free choices, so `cim-plugin where` stays quick."""
    code = ("import sys, cim_plugin.config, cim_plugin.cli; cim_plugin.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_mask_source_and_bilevel_mode_the_config_accepts_is_one_the_core_builds():
    for name in MASK_SOURCES:
        assert validate_args({"cim_mask": name}) == [] and make_mask_source(name, 2, 0.6).name == name
    for mode in BILEVEL_MODES:
        assert validate_args({"cim_bilevel": mode}) == [] and BilevelSettings(factor=2, mode=mode).mode == mode
