"""The PCA feature memory's core without PyCIL (core/pca_memory.py, the batched codec's helpers), its
keys and refusals (config.py), the ablation variants, the stage split and freezing on a small ResNet
built here (pycil/stages.py: no PyCIL import), and its parts' state through the checkpoint encoding
(read with weights_only=True)."""

import numpy as np
import pytest
import torch
from torch import nn

from cim_plugin import ablation
from cim_plugin.config import ConfigError, CIMConfig, validate_args, variant_keys
from cim_plugin.core.feature_pca import PCACode, code_bytes, decode, encode, position_cosine
from cim_plugin.core.pca_memory import PCAMemory
from cim_plugin.pycil.checkpoint import decode as ckpt_decode
from cim_plugin.pycil.checkpoint import encode as ckpt_encode
from cim_plugin.pycil.stages import check_split, freeze_lower, resolve_stage, upper_features

#: resnet32's map entering stage_3 at 32 px: 32 channels × 16 × 16; one raw 32 px image is 3,072 bytes.
SHAPE, FULL = (32, 16, 16), 3072


def codes(n: int, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, PCACode]:
    maps = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).relu()
    return maps, encode(maps, None, k)


def test_bytes_are_counted_exactly_and_the_budget_buys_whole_codes():
    mem = PCAMemory(SHAPE, 5, FULL, (32, 32, 3))
    assert mem.item_bytes == code_bytes(32, 256, 5) == 32 + 5 * 32 + 5 * 256 + 11 * 4 == 1516
    assert mem.capacity(2) == 6144 // 1516 == 4 and mem.capacity(0) == 0 and mem.capacity(0.49) == 0
    maps, code = codes(10)
    cos = position_cosine(maps, decode(code)).numpy()
    assert mem.add_class(3, code, np.arange(10), cos, units=2) == 4
    assert mem.add_class(5, code.select(slice(0, 2)), np.arange(2), cos[:2], units=2) == 2  # fewer than it buys
    s = mem.summary(2, 2)
    assert s["bytes_used"] == 6 * 1516 == mem.code(3).nbytes() + mem.code(5).nbytes() <= s["budget_bytes"] == 2 * 2 * FULL
    assert s["bytes_per_exemplar"]["mean"] == s["analytic_bytes_per_exemplar"] == 1516  # measured = analytic
    assert s["exemplars_per_class"] == {"3": 4, "5": 2} and s["metadata_bytes"] == 6 * (8 + 4)
    assert mem.code(3).coeffs.dtype == torch.uint8 and mem.code(3).ranges.dtype == torch.float16
    first = mem.code(3).coeffs[:1].clone()
    assert mem.reduce(1516 / FULL) == {3: 3, 5: 1}  # the ranked list is cut, never re-chosen
    assert torch.equal(mem.code(3).coeffs, first) and mem.bytes_used() == 2 * 1516
    with pytest.raises(ValueError, match="k must lie"):
        PCAMemory(SHAPE, 33, FULL)


def test_all_batches_codes_and_class_means_decode_them_in_batches():
    mem = PCAMemory(SHAPE, 5, FULL)
    for label in (0, 2):
        maps, code = codes(3, seed=label)
        mem.add_class(label, code, np.arange(3), np.ones(3))
    code, labels = mem.all()
    assert len(code) == 6 and labels.tolist() == [0, 0, 0, 2, 2, 2]
    assert torch.equal(decode(code.select(torch.tensor([4]))), decode(mem.code(2).select(slice(1, 2))))
    means, figures = mem.class_means(lambda m: m.mean(dim=(2, 3)), 3, 32, batch_size=2)
    assert means.shape == (3, 32) and np.allclose(np.linalg.norm(means[[0, 2]], axis=1), 1) and not means[1].any()
    assert figures["decoded"] == 6 and figures["decode_seconds"] >= 0


def test_the_state_goes_through_the_checkpoint_encoding_exactly(tmp_path):
    mem = PCAMemory(SHAPE, 5, FULL, (32, 32, 3))
    maps, code = codes(4)
    mem.add_class(1, code, np.array([3, 0, 2, 1]), np.linspace(0.8, 0.9, 4))
    torch.save(ckpt_encode(mem.state_dict()), tmp_path / "m.pt")
    back = PCAMemory(SHAPE, 5, FULL, (32, 32, 3))
    back.load_state_dict(ckpt_decode(torch.load(tmp_path / "m.pt", weights_only=True)))
    assert all(torch.equal(a, b) for a, b in zip(back.code(1).tensors(), mem.code(1).tensors()))
    assert back.positions(1).tolist() == [3, 0, 2, 1] and back.summary() == mem.summary()
    with pytest.raises(ValueError, match="k: saved 5, this run 3"):
        PCAMemory(SHAPE, 3, FULL).load_state_dict(mem.state_dict())


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TinyResNet(nn.Module):
    """resnet32's layout in miniature: a stem, stage_1..stage_3, avgpool; PyCIL's output dict."""

    def __init__(self):
        super().__init__()
        self.conv_1_3x3, self.bn_1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.stage_1, self.stage_2, self.stage_3 = Block(4, 4, 1), Block(4, 8, 2), Block(8, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x1 = self.stage_1(torch.relu(self.bn_1(self.conv_1_3x3(x))))
        x2 = self.stage_2(x1)
        x3 = self.stage_3(x2)
        return {"fmaps": [x1, x2, x3], "features": torch.flatten(self.avgpool(x3), 1)}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.convnet, self.fc = TinyResNet(), nn.Linear(16, 3)


def test_the_split_reproduces_the_features_and_freezing_keeps_the_lower_part_fixed():
    torch.manual_seed(0)
    net = TinyNet()
    assert resolve_stage(net, None) == "stage_3" and resolve_stage(net, "stage_2") == "stage_2"
    with pytest.raises(ConfigError, match="'cim_feature_stage' = 'stage_1'.*'stage_2', 'stage_3'"):
        resolve_stage(net, "stage_1")
    x = torch.randn(4, 3, 16, 16)
    assert check_split(net, "stage_3", x) == (8, 8, 8)
    odd = TinyNet()
    odd.convnet.forward = lambda x: {"features": 2 * TinyResNet.forward(odd.convnet, x)["features"]}
    with pytest.raises(ConfigError, match="do not reproduce the backbone's features"):
        check_split(odd, "stage_3", x)
    frozen = freeze_lower(net, "stage_3")
    assert frozen == sum(p.numel() for n, p in net.convnet.named_parameters() if not n.startswith("stage_3"))
    assert freeze_lower(net, "stage_3") == frozen  # idempotent: one BN hook each
    lower = {k: v.clone() for k, v in net.convnet.state_dict().items() if not k.startswith("stage_3")}
    net.train()  # what PyCIL's loops do every epoch
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net.fc(net.convnet(x)["features"]), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    assert all(torch.equal(lower[k], v) for k, v in net.convnet.state_dict().items() if k in lower)
    assert net.convnet.bn_1.training is False and net.convnet.stage_3.bn.training is True
    # rehearsal through the upper stages: gradient on stage_3 and fc only
    net.zero_grad(set_to_none=True)
    maps = torch.randn(2, 8, 8, 8)
    nn.functional.cross_entropy(net.fc(upper_features(net.convnet, "stage_3", maps)), torch.tensor([1, 2])).backward()
    assert all((p.grad is not None) == n.startswith(("convnet.stage_3", "fc")) for n, p in net.named_parameters())


def test_keys_refusals_and_variants():
    cfg = CIMConfig.from_args({"cim": True, "model_name": "lucir", "cim_memory": "pca", "cim_pca_components": 8,
                               "cim_feature_stage": "layer3"})
    assert (cfg.cim_memory, cfg.cim_pca_components, cfg.cim_feature_stage, cfg.cim_freeze_lower) == ("pca", 8, "layer3", False)
    assert CIMConfig.from_args({}).cim_pca_components == 5 and CIMConfig.from_args({}).cim_feature_stage is None
    for bad in (0, 2.5, "5", True):
        with pytest.raises(ConfigError, match=f"key 'cim_pca_components' = {bad!r}: must be an integer >= 1"):
            CIMConfig.from_args({"cim_pca_components": bad})
    for bad in ("", 3, None):
        with pytest.raises(ConfigError, match="key 'cim_feature_stage'.*must be a non-empty string"):
            CIMConfig.from_args({"cim_feature_stage": bad})
    with pytest.raises(ConfigError, match="key 'cim_freeze_lower' = 'yes': must be true or false"):
        CIMConfig.from_args({"cim_freeze_lower": "yes"})
    with pytest.raises(ConfigError, match="'cim_pca_componets' is not a cim-plugin key \\(did you mean 'cim_pca_components'"):
        CIMConfig.from_args({"cim_pca_componets": 5})
    for learner in ("der", "foster"):
        problems = validate_args({"cim": True, "model_name": learner, "cim_memory": "pca"})
        assert len(problems) == 1 and "'cim_memory' = 'pca' is not built for model_name" in problems[0]
        problems = validate_args({"model_name": learner, "cim_freeze_lower": True})
        assert len(problems) == 1 and "'cim_freeze_lower'" in problems[0] and repr(learner) in problems[0]
    assert any('needs "cim": true' in p for p in validate_args({"model_name": "icarl", "cim_memory": "pca"}))
    assert validate_args({"model_name": "icarl", "cim_freeze_lower": True}) == []  # plugin off: allowed
    assert variant_keys("pca") == {"cim": True, "cim_memory": "pca"}
    assert variant_keys("frozen") == {"cim": False, "cim_freeze_lower": True}
    base = {"model_name": "icarl", "dataset": "cifar100", "seed": [1], "cim_pca_components": 3}
    assert ablation.variant_config(base, "pca", 3)["cim_memory"] == "pca"
    frozen = ablation.variant_config(base, "frozen", 3)
    assert frozen["cim"] is False and frozen["cim_freeze_lower"] is True and "cim_memory" not in frozen
    specs = ablation.plan([base], ["pca", "off", "frozen", "features"], [1])
    assert [s.variant for s in specs] == ["off", "features", "pca", "frozen"]


def test_torchrun_is_refused(monkeypatch):
    from cim_plugin.pycil.features import feature_memory_problems

    monkeypatch.setenv("WORLD_SIZE", "2")
    problems = feature_memory_problems({"cim": True, "cim_memory": "pca"})
    assert len(problems) == 1 and "torchrun" in problems[0] and "'pca'" in problems[0]
