"""The adapter's PyCIL-free parts on their own: the memory builder (with a fake encoder), the
branch trainer and the artefact augmentation's state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cim_plugin.core.augmentation import ArtefactAugmentation
from cim_plugin.core.bilevel import BilevelSettings
from cim_plugin.core.branch_trainer import BranchTrainer
from cim_plugin.core.diagnostics import StoredDiagnostics
from cim_plugin.core.gallery import Gallery
from cim_plugin.core.herding import herding_rank
from cim_plugin.core.masks import make_mask_source
from cim_plugin.core.memory import CompressedExemplarMemory, ExemplarMemory
from cim_plugin.core.memory_builder import MemoryBuilder, l2_normalize

from fakes import TinyNet

S = 8


class MeanEncoder:
    """Features = per-channel means of the image and of its top-left quarter (so compression
    changes them); CAM = brightness on a 2x2 grid. Records what it was shown."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def features(self, images):
        x = torch.as_tensor(np.asarray(images)).float()
        self.seen.append(np.asarray(images))
        return torch.cat([x.mean((1, 2)), x[:, : S // 2, : S // 2].mean((1, 2))], dim=1)

    def cams(self, images, labels, features=True):
        x = torch.as_tensor(np.asarray(images)).float().mean(-1)
        cam = x.reshape(len(x), 2, S // 2, 2, S // 2).mean((2, 4))
        return cam, (self.features(images) if features else None)


def candidates(n=10, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 60, (n, S, S, 3), dtype=np.uint8)
    imgs[:, :4, :4] += rng.integers(100, 190, (n, 1, 1, 3), dtype=np.uint8)  # a bright object top-left
    return imgs


def builder(memory, source="cam", observers=()):
    return MemoryBuilder(memory, make_mask_source(source, 2, 0.5), MeanEncoder(), batch_size=4, observers=observers)


def test_fill_class_stores_the_herding_prefix_of_what_the_memory_will_hold():
    mem = CompressedExemplarMemory((S, S, 3), 4.0)
    b = builder(mem)
    imgs = candidates()
    b.fill_class(3, imgs, budget=2.0)
    boxes = b.boxes(imgs, np.full(len(imgs), 3)).boxes.numpy()
    kept = mem.reconstruct(imgs, boxes)
    enc = MeanEncoder()
    expected = herding_rank(l2_normalize(enc.features(kept)), l2_normalize(enc.features(imgs)).mean(0), mem.costs_of(boxes), 2.0)
    assert mem.count(3) == len(expected) > 2  # compressed: more than 2 exemplars in 2 units
    np.testing.assert_array_equal(mem.images(3), mem.reconstruct(imgs[expected], boxes[expected]))
    assert mem.units_used(3) <= 2.0


def test_a_plain_memory_through_the_same_builder_keeps_whole_images():
    mem = ExemplarMemory((S, S, 3))
    b = builder(mem, source="uniform")
    imgs = candidates()
    b.fill_class(0, imgs, budget=3.0)
    assert mem.count(0) == 3 and mem.units_used(0) == 3.0
    stored = mem.images(0)
    assert all(any(np.array_equal(s, c) for c in imgs) for s in stored)  # uncompressed originals


def test_ranking_uses_the_memory_reconstruction():
    """The codec seam: the builder ranks by the features of ``memory.reconstruct``."""

    class Darkening(ExemplarMemory):
        def reconstruct(self, images, boxes):
            return images // 2

    mem = Darkening((S, S, 3))
    b = builder(mem, source="uniform")
    imgs = candidates(4)  # one batch
    b.fill_class(0, imgs, budget=2.0)
    assert any(np.array_equal(s, imgs // 2) for s in b.encoder.seen)


def test_observers_see_each_class_and_get_cams_only_when_they_ask():
    seen = []

    class Recorder:
        def wants_cams(self, label, has_truth):
            return label == 1

        def observe(self, filled, memory):
            seen.append((filled.label, None if filled.cams is None else tuple(filled.cams.shape), memory.count(filled.label)))

    mem = CompressedExemplarMemory((S, S, 3), 4.0)
    b = builder(mem, observers=[Recorder()])
    b.fill_class(0, candidates(6), 2.0)
    b.fill_class(1, candidates(6, seed=1), 2.0)
    assert seen[0][:2] == (0, None) and seen[1][:2] == (1, (6, 2, 2))
    assert all(n == mem.count(label) for label, _, n in seen)


def test_diagnostics_and_gallery_as_observers():
    mem = CompressedExemplarMemory((S, S, 3), 4.0)
    diag, gallery = StoredDiagnostics(), Gallery(classes=1, source="cam")
    b = builder(mem, observers=[diag, gallery])
    truth = np.tile(np.array([[0, 4, 0, 4]]), (10, 1))
    b.fill_class(0, candidates(), 2.0, truth=truth)
    b.fill_class(1, candidates(seed=1), 2.0, truth=truth)
    out = diag.summary(mem)
    assert out["stored"]["exemplars"] == len(mem)
    assert out["stored"]["mean_box_recall"] == pytest.approx(1.0)  # the bright quarter is the object
    assert [row["tau"] for row in out["tau_curve"]][:1] == [0.2]
    assert sorted(gallery.rows) == [0]  # only the first class is in the gallery
    mem.reduce(1.0)  # a shrinking budget cuts the diagnostics with the memory
    assert diag.summary(mem)["stored"]["exemplars"] == len(mem)


def test_class_means_are_unit_vectors_of_the_stored_exemplars():
    mem = CompressedExemplarMemory((S, S, 3), 4.0)
    b = builder(mem)
    b.fill_class(1, candidates(), 2.0)
    means = b.class_means(num_classes=3, dim=6)
    assert means.shape == (3, 6) and np.allclose(means[[0, 2]], 0)
    assert np.linalg.norm(means[1]) == pytest.approx(1.0)
    expected = l2_normalize(MeanEncoder().features(mem.images(1))).mean(0)
    np.testing.assert_allclose(means[1], (expected / expected.norm()).numpy(), rtol=1e-6)


def test_branch_trainer_stage_life_cycle(monkeypatch):
    from cim_plugin.core import branch_trainer

    calls = []
    monkeypatch.setattr(branch_trainer, "mask_step", lambda *a, **k: calls.append(a[6]) or {"outer_ce": 1.0})
    net = TinyNet()
    trainer = BranchTrainer(BilevelSettings(factor=2), phi_lr=0.01, phi_weight_decay=5e-4, train_old=False)
    trainer.sync([net.convnet], "cpu")
    batches = lambda: iter(lambda: (torch.zeros(2, 3, S, S), torch.zeros(2, dtype=torch.int64)), None)  # noqa: E731
    parts, skipped = trainer.train(net, [], lambda x, y: None, lambda *a: None, batches, iters=3, stage_steps=6, inner_lr=0.05)
    assert parts == {"outer_ce": 1.0} and skipped == 0 and trainer.steps == 3 and calls == [0.05] * 3
    opt = trainer.optimizer
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    trainer.train(net, [], None, None, batches, iters=1, stage_steps=6, inner_lr=0.05)
    assert trainer.optimizer is opt and trainer.steps == 4  # same stage
    trainer.begin_phase()
    trainer.sync([net.convnet], "cpu")  # the first sync of a phase starts a new stage
    assert trainer.optimizer is None and trainer.steps == 0


def test_branch_trainer_builds_its_branch_with_the_pau_options():
    from cim_plugin.core.pau import PAU

    net = TinyNet()
    default = BranchTrainer(BilevelSettings(factor=2), 0.01, 0.0, False).sync([net.convnet], "cpu")
    wide = BranchTrainer(BilevelSettings(factor=2), 0.01, 0.0, False, pau_options={"init_range": 6.0}).sync([net.convnet], "cpu")
    assert wide.pau_options["init_range"] == 6.0 and default.pau_options["init_range"] == 3.0
    site = wide.sites(0)[0]
    assert wide.pau(0, site).input_scale == PAU(init_range=6.0).input_scale == 2.0
    assert default.pau(0, site).input_scale == 1.0


def test_a_step_after_a_bad_update_sets_phi_back_to_before_it(monkeypatch):
    # a finite step that makes the branch overflow only shows at the next step (its loss is NaN):
    # skipping that step alone would keep the broken φ for good
    from cim_plugin.core import branch_trainer

    outcomes = iter([{"outer_ce": 1.0}, {"outer_ce": 1.0, "skipped": 1}, {"outer_ce": 1.0}])

    def fake_step(*a, **k):
        phi = a[7]
        out = next(outcomes)
        if not out.get("skipped"):
            with torch.no_grad():
                for p in phi:
                    p.add_(1.0)  # an applied update
        return out

    monkeypatch.setattr(branch_trainer, "mask_step", fake_step)
    net = TinyNet()
    trainer = BranchTrainer(BilevelSettings(factor=2), phi_lr=0.01, phi_weight_decay=0.0, train_old=False)
    branch = trainer.sync([net.convnet], "cpu")
    start = [p.detach().clone() for p in branch.trainable_parameters()]
    batches = lambda: iter(lambda: (torch.zeros(2, 3, S, S), torch.zeros(2, dtype=torch.int64)), None)  # noqa: E731
    parts, skipped = trainer.train(net, [], None, None, batches, iters=2, stage_steps=6, inner_lr=0.05)
    assert skipped == 1 and parts.get("rolled_back") == 1
    for p, s0 in zip(branch.trainable_parameters(), start):
        torch.testing.assert_close(p.detach(), s0)  # the first update undone
    trainer.train(net, [], None, None, batches, iters=1, stage_steps=6, inner_lr=0.05)
    for p, s0 in zip(branch.trainable_parameters(), start):
        torch.testing.assert_close(p.detach(), s0 + 1.0)  # training goes on from there


def test_branch_trainer_without_bilevel_is_inactive():
    assert not BranchTrainer(BilevelSettings(factor=2, mode="none"), 0.01, 0.0, False).active


def test_augmentation_refreshes_on_schedule_and_caps_the_share():
    aug = ArtefactAugmentation(factor=2, interval=3, share_step=0.4)
    assert [e for e in range(1, 10) if aug.due(e)] == [3, 6, 9]
    for _ in range(3):
        aug.refresh(np.zeros((2, 4)))
    assert aug.share == 1.0 and aug.boxes.dtype == np.int64
    aug.reset()
    assert aug.share == 0.0 and aug.boxes is None
    assert not ArtefactAugmentation(2, 3, 0.0).due(3)


def test_the_full_source_gives_plain_exemplars_in_the_compressed_memory():
    """cim_mask "full": plugin-off's exemplars through the plugin's storage (cost 1, unchanged)."""
    mem = CompressedExemplarMemory((S, S, 3), 4.0)
    imgs = candidates()
    b = builder(mem, source="full")
    b.fill_class(0, imgs, budget=3.0, aspects=np.full(len(imgs), 1.5))
    assert mem.count(0) == 3 and mem.units_used(0) == 3.0
    assert all(any(np.array_equal(s, c) for c in imgs) for s in mem.images(0))
    assert mem.item_view(0)[2] == 1.5  # the aspects travel with the ranked exemplars


def test_the_pau_init_range_key_reaches_the_branch_trainer():
    from cim_plugin.config import CIMConfig
    from cim_plugin.pycil.parts import CIMParts

    parts = CIMParts(CIMConfig.from_args({"cim_pau_init_range": 6.0}), object())
    assert parts.trainer.pau_options == {"init_range": 6.0}
    assert CIMParts(CIMConfig.from_args({}), object()).trainer.pau_options == {"init_range": 3.0}
