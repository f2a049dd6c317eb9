"""The feature memory's core without PyCIL (core/feature_memory.py, core/feature_adapter.py), its
keys and refusals (config.py), the ablation variant, and its parts' explicit state through the
checkpoint encoding (read with weights_only=True)."""

import numpy as np
import pytest
import torch

from cim_plugin import ablation
from cim_plugin.config import ConfigError, CIMConfig, validate_args, variant_keys
from cim_plugin.core.feature_adapter import AdapterSettings, FeatureAdapter, RehearsalOptimizer, mean_cosine, train_adapter
from cim_plugin.core.feature_memory import FeatureMemory
from cim_plugin.pycil.checkpoint import decode, encode


def test_bytes_are_counted_exactly_and_the_budget_buys_whole_vectors():
    # 32 x 32 x 3 images: 3,072 bytes per full exemplar; 64-d float16 vectors: 128 bytes each
    mem = FeatureMemory(64, "float16", 3072, (32, 32, 3))
    assert mem.item_bytes == 128 and mem.capacity(2) == 48 and mem.capacity(0) == 0
    rng = np.random.default_rng(0)
    kept = mem.add_class(3, rng.standard_normal((60, 64)), np.arange(60), units=2)
    assert kept == 48
    mem.add_class(5, rng.standard_normal((10, 64)), np.arange(10), units=2)  # fewer candidates than the budget buys
    s = mem.summary(2, 2)
    assert s["bytes_used"] == (48 + 10) * 64 * 2 == mem.features(3).nbytes + mem.features(5).nbytes
    assert s["bytes_used"] <= s["budget_bytes"] == 2 * 2 * 3072
    assert s["metadata_bytes"] == 58 * 8 and s["exemplars_per_class"] == {"3": 48, "5": 10}
    assert s["kind"] == "features" and s["feature_dtype"] == "float16" and mem.features(3).dtype == np.float16
    # float32 doubles the bytes of a vector and halves what fits
    assert FeatureMemory(64, "float32", 3072).capacity(2) == 24
    # the ranked list is cut, never re-chosen
    first = mem.features(3)[:20]
    assert mem.reduce(20 * 128 / 3072) == {3: 28}
    np.testing.assert_array_equal(mem.features(3), first)
    assert mem.bytes_used() == (20 + 10) * 128


def test_the_adapter_starts_as_the_identity_and_carries_the_memory():
    adapter = FeatureAdapter(16, 32, torch.Generator().manual_seed(0))
    x = torch.randn(5, 16)
    assert torch.equal(adapter(x), x)
    mem = FeatureMemory(16, "float32", 1000)
    mem.add_class(0, x.numpy(), np.arange(5))
    mem.transform(lambda v: 2 * v)
    np.testing.assert_allclose(mem.features(0), 2 * x.numpy())


def test_adaptation_reduces_drift_on_held_out_vectors(one_thread):
    """A new model whose features are a rotation of the old ones (plus noise): the MLP trained on one
    set of images brings *other* images' stored (old) vectors close to their new features."""
    g = torch.Generator().manual_seed(0)
    dim = 16
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    old = torch.randn(600, dim, generator=g) + 2.0
    new = old @ rotation + 0.05 * torch.randn(600, dim, generator=g)
    labels = torch.zeros(600, dtype=torch.int64)
    train, held = slice(0, 500), slice(500, 600)
    adapter, figures = train_adapter(old[train], new[train], labels[train],
                                     AdapterSettings(epochs=40, hidden=64, lr=3e-3, batch_size=64), generator=g)
    before = mean_cosine(old[held], new[held])
    with torch.no_grad():
        after = mean_cosine(adapter(old[held]), new[held])
    assert before < 0.6 and after > 0.95, (before, after)
    assert figures["cosine_after"] > figures["cosine_before"] and figures["pairs"] == 500
    # the same seed gives the same adapter: reproducible phases
    again, _ = train_adapter(old[train], new[train], labels[train],
                             AdapterSettings(epochs=2, hidden=64, lr=3e-3, batch_size=64), generator=torch.Generator().manual_seed(1))
    twice, _ = train_adapter(old[train], new[train], labels[train],
                             AdapterSettings(epochs=2, hidden=64, lr=3e-3, batch_size=64), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), twice.state_dict().values()))


def test_the_classification_term_uses_the_classifier_without_training_it():
    g = torch.Generator().manual_seed(0)
    fc = torch.nn.Linear(8, 3)
    before = [p.clone() for p in fc.parameters()]
    old, new = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(3, (40,), generator=g)
    params = {n: p.detach() for n, p in fc.named_parameters()}
    _, figures = train_adapter(old, new, labels, AdapterSettings(epochs=2, hidden=8, batch_size=16),
                               lambda z: torch.func.functional_call(fc, params, (z,)), g)
    assert figures["last_cls_loss"] is not None
    assert all(torch.equal(a, b) for a, b in zip(before, fc.parameters())) and all(p.grad is None for p in fc.parameters())


def test_the_rehearsal_optimiser_steps_on_the_sum_of_both_losses():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = RehearsalOptimizer(torch.optim.SGD([w], lr=1.0), lambda: (2 * w).sum())
    opt.zero_grad()
    (w * torch.tensor([1.0, 0.0, -1.0])).sum().backward()  # the learner's own loss
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([-3.0, -2.0, -1.0]))  # −(own gradient + extra gradient 2)
    assert opt.steps == 1 and opt.param_groups[0]["lr"] == 1.0  # everything else is the optimiser's


def test_keys_and_refusals():
    cfg = CIMConfig.from_args({"cim": True, "model_name": "lucir", "cim_memory": "features", "cim_feature_dtype": "float32"})
    assert cfg.cim_memory == "features" and cfg.cim_feature_dtype == "float32"
    assert CIMConfig.from_args({}).cim_memory == "image"
    for learner in ("der", "foster"):
        problems = validate_args({"cim": True, "model_name": learner, "cim_memory": "features"})
        assert len(problems) == 1 and "cim_memory" in problems[0] and repr(learner) in problems[0]
    assert validate_args({"cim": True, "model_name": "icarl", "cim_memory": "pca"}) == []  # part 2: tests/test_pca_memory.py
    assert any('needs "cim": true' in p for p in validate_args({"model_name": "icarl", "cim_memory": "features"}))
    with pytest.raises(ConfigError, match="cim_feature_dtype"):
        CIMConfig.from_args({"cim_feature_dtype": "int8"})
    assert variant_keys("features") == {"cim": True, "cim_memory": "features"}
    base = {"model_name": "icarl", "seed": [1], "cim_memory": "features", "cim": True}
    assert "cim_memory" not in ablation.variant_config(base, "pau", 3)  # images (the default), not the JSON's features
    assert "cim_memory" not in ablation.variant_config(base, "off", 3)
    assert ablation.variant_config(base, "features", 3)["cim_memory"] == "features"


def test_the_parts_state_goes_through_the_explicit_checkpoint_encoding(tmp_path):
    from cim_plugin.pycil.features import FeatureParts

    cfg = CIMConfig.from_args({"cim": True, "model_name": "icarl", "cim_memory": "features"})
    a = FeatureParts(cfg, learner=None)
    a.memory = FeatureMemory(4, "float16", 48, (4, 4, 3))
    a.memory.add_class(2, np.random.default_rng(0).standard_normal((5, 4)), np.arange(5), units=1)
    a.adapter = FeatureAdapter(4, 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.adapter.outer.weight.normal_()
    a.report = {"drift_cosine_before": 0.5, "drift_cosine_after": 0.9, "stored": 5}
    torch.save(encode(a.state_dict()), tmp_path / "parts.pt")
    b = FeatureParts(cfg, learner=None)
    b.load_state_dict(decode(torch.load(tmp_path / "parts.pt", weights_only=True)))
    np.testing.assert_array_equal(b.memory.features(2), a.memory.features(2))
    assert b.memory.features(2).dtype == np.float16 and b.report == a.report
    x = torch.randn(3, 4)
    assert torch.equal(b.adapter(x), a.adapter(x))
    wrong = FeatureParts(CIMConfig.from_args({"cim": True, "model_name": "icarl", "cim_memory": "features",
                                               "cim_feature_dtype": "float32"}), learner=None)
    with pytest.raises(ValueError, match="float16"):
        wrong.load_state_dict(decode(torch.load(tmp_path / "parts.pt", weights_only=True)))


def test_the_classifier_step_trains_only_the_trainable_rows():
    from cim_plugin.core.feature_adapter import train_classifier

    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(30)
    feats = centres[labels] + 0.3 * torch.randn(120, 8, generator=g)
    fc = torch.nn.Linear(8, 4)
    fc.bias.requires_grad_(False)  # as LUCIR's frozen old-class rows
    bias = fc.bias.clone()
    figures = train_classifier(fc, fc, feats, labels, epochs=30, lr=0.05, batch_size=32, generator=g)
    assert figures["top1_after"] == 100.0 > figures["top1_before"] and figures["loss_after"] < figures["loss_before"]
    assert torch.equal(fc.bias, bias) and fc.weight.grad is None
