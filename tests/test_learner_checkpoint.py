"""The plugin's parts travel in checkpoints as explicit state: φ, the compressed memory, the
stored-exemplar diagnostics, the gallery rows and the random source's generator, encoded by
checkpoint.py so that the file loads with ``torch.load(..., weights_only=True)`` (no PyCIL needed)."""

import numpy as np
import torch

from cim_plugin.config import CIMConfig
from cim_plugin.core.memory import CompressedExemplarMemory
from cim_plugin.pycil import nets
from cim_plugin.pycil.checkpoint import decode, encode
from cim_plugin.pycil.learner import CIMLearnerMixin

from fakes import FakeBaseLearner


class Learner(CIMLearnerMixin, FakeBaseLearner):
    pass


def make(seed=0, mask="pau"):
    torch.manual_seed(seed)
    learner = Learner()
    learner.cim_setup(CIMConfig.from_args({"cim": True, "model_name": "icarl", "cim_mask": mask}))
    return learner


def test_phi_memory_and_diagnostics_are_saved_and_restored(tmp_path):
    a = make()
    branch = a.cim.branch()
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p))
    a.cim.use_memory(CompressedExemplarMemory((8, 8, 3), 4.0))
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    a.cim.memory.add_class(1, imgs, np.array([[0, 4, 0, 4]] * 3))
    a.cim.diagnostics.per_class[1] = {"recall": np.ones(3), "area": np.full(3, 0.25), "mse": np.zeros(3)}
    a.cim.gallery.rows[np.int64(1)] = (imgs[0], np.random.default_rng(1).random((8, 8)), np.array([0, 4, 0, 4]), 0.5)
    branch.set_trainable([0], False)
    path = tmp_path / "parts.pt"
    torch.save(encode(a.cim_state_dict()), path)

    b = make(seed=1)
    b._network.load_state_dict(a._network.state_dict())
    b.cim_load_state_dict(decode(torch.load(path, weights_only=True)))
    # as saved, before the next sync sets the flags of the phase (the last backbone's φ trainable)
    assert [p.requires_grad for p in b.cim.trainer.branch.parameters()] == [p.requires_grad for p in branch.parameters()]
    for (ka, va), (kb, vb) in zip(branch.state_dict().items(), b.cim.branch().state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert [b.cim.branch().sites(i) for i in range(b.cim.branch().num_backbones)] == [branch.sites(0)]
    row_a, row_b = a.cim.gallery.rows[1], b.cim.gallery.rows[1]
    assert all(np.array_equal(x, y) for x, y in zip(row_a[:3], row_b[:3])) and row_b[3] == 0.5
    assert all(x is y for x, y in zip(b.cim.branch().backbones, nets.backbones(b._network)))  # bound to b's network
    np.testing.assert_array_equal(b.cim.memory.images(1), a.cim.memory.images(1))
    assert b.cim.builder.memory is b.cim.memory  # the builder fills the restored memory
    assert b.cim_diagnostics()["stored"]["mean_box_area"] == 0.25
    # a fresh branch would sit at the ReLU fit: the restore really changed φ
    fresh = make(seed=2).cim.branch()
    assert any(not torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), b.cim.branch().state_dict().values()))


def test_the_random_sources_generator_resumes_where_it_was(tmp_path):
    a = make(mask="random")
    torch.rand(5, generator=a.cim.source.generator)  # boxes drawn in earlier phases
    state = encode(a.cim_state_dict())
    expected = torch.rand(3, generator=a.cim.source.generator)
    b = make(mask="random")
    b.cim_load_state_dict(decode(state))
    assert torch.equal(torch.rand(3, generator=b.cim.source.generator), expected)
