"""The plugin's LUCIR learner: its loss pieces (core/lucir_losses.py, no PyCIL needed), the learner's
loss terms, and PyCIL's main.py running it (memory, no memory, CIM).

The tests marked ``pycil`` need a PyCIL checkout (PYCIL_ROOT, else the one `cim-plugin patch`
recorded; conftest's ``patched_pycil``): the checkout is cloned into a temporary folder and patched
there; the user's checkout is never touched. The three runs of main.py run side by side (one thread each,
one per core).
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from cim_plugin.core.lucir_losses import less_forget_loss, less_forget_weight, margin_ranking_loss
from fakes import TINY_RUN, MainRuns, assert_more_exemplars_in_no_more_bytes, results_of

#: 8 classes at 32 px (cosine_resnet32 needs 32 px), 5 then 3 classes, a few epochs.
TINY = {**TINY_RUN, "prefix": "lucir", "synthetic_image_size": 32, "synthetic_train_per_class": 40,
        "synthetic_test_per_class": 15, "memory_size": 80, "memory_per_class": 10, "convnet_type": "cosine_resnet32",
        "batch_size": 32, "model_name": "lucir",
        "init_epoch": 10, "init_lr": 0.05, "init_milestones": [7], "epochs": 8, "lrate": 0.05, "milestones": [6]}
CIM = {"cim": True, "cim_mask": "cam", "cam_update_interval": 3, "randombbxblur_prob_incre": 0.5}
PYCIL_PACKAGES = ("models", "utils", "convs")


@pytest.fixture(scope="module")
def lucir(patched_pycil):
    """cim_plugin.pycil.lucir, imported with the clone's PyCIL modules (removed again afterwards)."""
    sys.path.insert(0, str(patched_pycil))
    try:
        import cim_plugin.pycil.lucir as module

        yield module
    finally:
        sys.path.remove(str(patched_pycil))
        for name in list(sys.modules):
            if name.split(".")[0] in PYCIL_PACKAGES or name == "cim_plugin.pycil.lucir":
                del sys.modules[name]


# ----------------------------------------------------------------- loss pieces (no PyCIL)


def test_less_forget_weight_is_lambda_base_times_sqrt_old_over_new():
    assert less_forget_weight(5, 50, 10) == pytest.approx(5 * math.sqrt(5))
    assert less_forget_weight(5, 5, 3) == pytest.approx(6.455, abs=1e-3)
    assert less_forget_weight(10, 10, 10) == pytest.approx(10)


def test_less_forget_loss_is_one_minus_cosine_and_leaves_the_old_side_alone():
    torch.manual_seed(0)
    f = torch.randn(6, 16, requires_grad=True)
    old = torch.randn(6, 16, requires_grad=True)
    ref = torch.nn.CosineEmbeddingLoss()(f, old.detach(), torch.ones(6))
    loss = less_forget_loss(f, old)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert less_forget_loss(3.0 * old.detach(), old).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    e = torch.eye(2)
    assert less_forget_loss(e[:1], e[1:]).item() == pytest.approx(1.0)
    loss.backward()
    assert f.grad is not None and old.grad is None


def _reference_margin_ranking(cos, y, n_old, K, m):
    """The authors' formulation (MarginRankingLoss on gt vs top-K new scores of old samples)."""
    hard = y < n_old
    gt = cos[hard].gather(1, y[hard].view(-1, 1)).repeat(1, K)
    top = cos[hard, n_old:].topk(K, dim=1).values
    return torch.nn.MarginRankingLoss(margin=m)(gt.reshape(-1, 1), top.reshape(-1, 1), torch.ones(gt.numel(), 1))


def test_margin_ranking_uses_old_class_samples_and_top_k_new_scores():
    torch.manual_seed(1)
    n_old, n_new, K, m = 5, 4, 2, 0.5
    cos = (torch.rand(10, n_old + n_new) * 2 - 1).requires_grad_()
    y = torch.tensor([0, 6, 3, 8, 1, 5, 4, 7, 2, 6])
    loss = margin_ranking_loss(cos, y, n_old, K, m)
    assert loss.item() == pytest.approx(_reference_margin_ranking(cos, y, n_old, K, m).item(), abs=1e-6)
    # by hand for one old-class sample: gt 0.9, new scores 0.8, 0.1, 0.7, -1 -> top-2 are 0.8 and 0.7
    one = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.1, 0.7, -1.0]])
    expected = (max(0, m - (0.9 - 0.8)) + max(0, m - (0.9 - 0.7))) / 2
    assert margin_ranking_loss(one, torch.tensor([0]), n_old, K, m).item() == pytest.approx(expected)
    # rows of new-class samples do not matter; the third-largest new score does not matter
    changed = cos.detach().clone()
    changed[y >= n_old] = torch.rand(int((y >= n_old).sum()), n_old + n_new)
    assert margin_ranking_loss(changed, y, n_old, K, m).item() == pytest.approx(loss.item(), abs=1e-6)
    one_lowered = one.clone()
    one_lowered[0, 6] = -0.5
    assert margin_ranking_loss(one_lowered, torch.tensor([0]), n_old, K, m).item() == pytest.approx(expected)
    loss.backward()
    assert cos.grad[y >= n_old].abs().sum() == 0 and cos.grad[y < n_old].abs().sum() > 0
    # no old-class sample in the batch: zero, still part of the graph
    none = margin_ranking_loss(cos, torch.tensor([5, 6, 7, 8, 5, 6, 7, 8, 5, 6]), n_old, K, m)
    assert none.item() == 0 and none.requires_grad
    # K larger than the number of new classes: all new classes
    assert margin_ranking_loss(cos, y, n_old, 10, m).item() == pytest.approx(
        _reference_margin_ranking(cos, y, n_old, n_new, m).item(), abs=1e-6)


# ------------------------------------------------------------------------ the learner (PyCIL)


def _args(**over):
    return {"memory_size": 0, "device": [torch.device("cpu")], "convnet_type": "cosine_resnet32",
            "dataset": "synthetic", "init_cls": 5, "increment": 3, "model_name": "lucir", **over}


@pytest.mark.pycil
def test_cil_loss_terms_by_task(lucir):
    torch.manual_seed(2)
    learner = lucir.LUCIR(_args(lambda_base=5, K=2, margin=0.5, lambda_mr=2.0))
    net = learner._network
    net.update_fc(5, 0)
    learner._cur_task, learner._total_classes = 0, 5
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    out = net(x)
    assert set(learner.loss_terms(x, y, out)) == {"ce"}
    assert learner.cil_loss(x, y, out).item() == pytest.approx(F.cross_entropy(out["logits"], y).item())

    learner.after_task()
    net.update_fc(8, 1)
    learner._cur_task, learner._total_classes = 1, 8
    learner._lambda = less_forget_weight(5, 5, 3)
    y = torch.tensor([0, 6, 3, 7, 5, 1])
    out = net(x)
    terms = learner.loss_terms(x, y, out)
    assert set(terms) == {"ce", "lf", "mr"}
    cos = torch.cat([out["old_scores"], out["new_scores"]], dim=1)
    old_f = learner._old_network.extract_vector(x)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(out["logits"], y).item(), rel=1e-5)
    assert terms["lf"].item() == pytest.approx(learner._lambda * less_forget_loss(out["features"], old_f).item(), rel=1e-4)
    assert terms["mr"].item() == pytest.approx(2.0 * margin_ranking_loss(cos, y, 5, 2, 0.5).item(), rel=1e-5)
    # logits are sigma x the cosines the ranking loss reads
    assert torch.allclose(out["logits"], net.fc.sigma * cos, atol=1e-5)
    assert learner.cil_loss(x, y, out).item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-5)
    assert learner.cil_loss(x, y).item() == pytest.approx(learner.cil_loss(x, y, net(x)).item(), rel=1e-4)


@pytest.mark.pycil
def test_bad_backbone_and_other_learners_key_names_are_refused(lucir):
    with pytest.raises(ValueError, match="cosine_resnet18"):
        lucir.LUCIR(_args(convnet_type="resnet18"))
    with pytest.raises(ValueError, match="'init_epochs' \\(lucir reads 'init_epoch'\\)"):
        lucir.LUCIR(_args(init_epochs=3))


@pytest.mark.pycil
def test_cam_rows_of_cosine_classifiers_are_normalised_in_class_order(lucir):
    from cim_plugin.pycil.nets import classifier_weight

    learner = lucir.LUCIR(_args())
    net = learner._network
    net.update_fc(5, 0)
    w = classifier_weight(net)
    assert w.shape == (5, 64) and torch.allclose(w, F.normalize(net.fc.weight, dim=1))
    net.update_fc(8, 1)
    w = classifier_weight(net)
    assert w.shape == (8, 64) and torch.allclose(w.norm(dim=1), torch.ones(8))
    assert torch.allclose(w[5:], F.normalize(net.fc.fc2.weight, dim=1))
    assert torch.allclose(w[:5], F.normalize(net.fc.fc1.weight, dim=1))


# -------------------------------------------------------------------------- PyCIL's main.py


@pytest.fixture(scope="module")
def runs(patched_pycil, tmp_path_factory):
    """LUCIR with memory (plugin off), without memory, and with the CIM plugin on."""
    tmp = tmp_path_factory.mktemp("lucir-runs")
    base = {**TINY, "data_root": str(tmp / "synthetic-cache")}
    configs = {
        "memory": {**base, "prefix": "memory", "cim": False},
        "no_memory": {**base, "prefix": "nomemory", "memory_size": 0, "cim": False},
        "cim": {**base, "prefix": "cim", **CIM},
    }
    runs = MainRuns(patched_pycil)  # side by side, one torch thread each
    for name, cfg in configs.items():
        runs.submit(name, cfg, tmp, name)
    return {name: (runs.result(name), results_of(runs.result(name), patched_pycil)) for name in configs}


@pytest.mark.pycil
def test_memory_keeps_more_old_class_accuracy(runs):
    (mem_proc, mem), (_, none) = runs["memory"], runs["no_memory"]
    assert [p["task"] for p in mem["phases"]] == [0, 1] == [p["task"] for p in none["phases"]]
    assert "less-forget weight 6.455 (5 old, 3 new classes)" in mem_proc.stdout
    assert mem["phases"][1]["memory"]["exemplars"] == 80 and none["phases"][1]["memory"]["exemplars"] == 0
    assert none["phases"][1]["nme_top1"] is None and mem["phases"][1]["nme_top1"] is not None
    old_mem, old_none = mem["phases"][1]["cnn_grouped"]["old"], none["phases"][1]["cnn_grouped"]["old"]
    print(f"old-class CNN accuracy after phase 2: {old_mem} with memory, {old_none} without; "
          f"NME old with memory {mem['phases'][1]['nme_grouped']['old']}")
    assert old_mem > old_none


@pytest.mark.pycil
def test_plugin_on_holds_more_exemplars_at_no_more_bytes(runs):
    (_, off), (on_proc, on) = runs["memory"], runs["cim"]
    assert off["cim"] is False and on["cim"] is True
    assert [p["task"] for p in on["phases"]] == [0, 1]
    assert_more_exemplars_in_no_more_bytes(off, on)
    assert all(phase["nme_top1"] is not None for phase in on["phases"])
    assert "compressed share now" in on_proc.stdout
