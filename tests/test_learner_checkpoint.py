"""φ and the compressed memory travel with the per-phase checkpoint (no PyCIL needed)."""

import numpy as np
import torch

from cim_plugin.config import CIMConfig
from cim_plugin.pycil.learner import CIMLearnerMixin
from cim_plugin.core.memory import CompressedExemplarMemory

from fakes import TinyNet


class FakeLearner:
    """The parts of PyCIL's BaseLearner the checkpoint path uses."""

    def __init__(self):
        self._cur_task, self._device, self.args = 0, "cpu", {}
        self._network = TinyNet()

    def save_checkpoint(self, filename):
        torch.save({"tasks": self._cur_task, "model_state_dict": self._network.state_dict()}, f"{filename}_{self._cur_task}.pkl")


class Learner(CIMLearnerMixin, FakeLearner):
    pass


def make(seed=0):
    torch.manual_seed(seed)
    learner = Learner()
    learner._cim_setup(CIMConfig.from_args({"cim": True, "model_name": "icarl", "cim_mask": "pau"}))
    return learner


def test_phi_and_memory_are_saved_and_restored(tmp_path):
    a = make()
    branch = a._cim_sync_branch()
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p))
    a._cim_memory = CompressedExemplarMemory((8, 8, 3), 4.0)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    a._cim_memory.add_class(1, imgs, np.array([[0, 4, 0, 4]] * 3))
    path = a.save_checkpoint(str(tmp_path / "ck"))
    assert (tmp_path / "ck_0.pkl").exists() and path.endswith("_0_cim.pt")

    b = make(seed=1)
    b._network.load_state_dict(torch.load(tmp_path / "ck_0.pkl")["model_state_dict"])
    b._cim_load_state_dict(torch.load(path, weights_only=False))
    for (ka, va), (kb, vb) in zip(branch.state_dict().items(), b._cim_branch.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    np.testing.assert_array_equal(b._cim_memory.images(1), a._cim_memory.images(1))
    # a fresh branch would sit at the ReLU fit: the restore really changed φ
    fresh = make(seed=2)._cim_sync_branch()
    assert any(not torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), b._cim_branch.state_dict().values()))
