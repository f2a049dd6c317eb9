"""cim_plugin/distributed.py and the DDP checks, without PyCIL: settings refused under torchrun, and
the helpers in a real 2-process gloo group (torch.multiprocessing spawn, CPU).

The whole runs under torchrun are in test_ddp.py.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cim_plugin import distributed
from cim_plugin.core.bilevel import BilevelSettings, mask_step
from cim_plugin.pycil.ddp import ddp_problems


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)


def test_nothing_is_checked_or_changed_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.active()
    assert ddp_problems({"model_name": "podnet", "device": ["-1", "0"]}) == []
    net = nn.Linear(2, 2)
    assert distributed.wrap_ddp(net, torch.device("cpu")) is net
    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=2, shuffle=True)
    assert distributed.sharded_loader(loader, 0) is loader
    grads = [torch.ones(3)]
    distributed.average_gradients(grads)
    assert torch.equal(grads[0], torch.ones(3))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.is_main()


def test_unsupported_settings_are_refused_under_torchrun_naming_them(torchrun_env):
    assert distributed.launched() and distributed.env_ranks() == (1, 2, 1)
    problems = ddp_problems({"model_name": "podnet", "device": ["-1"]})
    assert len(problems) == 1 and "'podnet'" in problems[0] and "icarl, der, foster, lucir" in problems[0]
    assert ddp_problems({"model_name": "FOSTER", "device": ["-1"]}) == []
    mixed = ddp_problems({"model_name": "icarl", "device": ["-1", "0"]})
    assert len(mixed) == 1 and "'device'" in mixed[0] and "not both" in mixed[0]


def test_bad_torchrun_variables_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    problems = ddp_problems({"model_name": "icarl", "device": ["-1"]})
    assert problems == ["torchrun: environment variable RANK = 'two' is not an integer"]
    monkeypatch.setenv("RANK", "2")
    assert "RANK 2 is not in [0, WORLD_SIZE 2)" in ddp_problems({"model_name": "icarl", "device": ["-1"]})[0]


def test_gpus_asked_for_without_cuda_is_an_error(torchrun_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.DistributedError, match="CUDA is not available"):
        distributed.setup(use_cuda=True)


# ------------------------------------------------------------------------- a real 2-process group


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.width = 3

    def forward(self, x):
        return self.body(x)

    def grow(self):  # an attribute PyCIL's loops reach through the wrapper (update_fc, weight_align, ...)
        return self.width + 1


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(use_cuda=False)
    try:
        res = {}
        # sharded loader: equal batch counts, disjoint shares covering the data, a new shuffle every pass
        data = TensorDataset(torch.arange(10))
        loader = distributed.sharded_loader(DataLoader(data, batch_size=2, shuffle=True), distributed.shard_seed())
        passes = [[int(i) for (b,) in loader for i in b] for _ in range(2)]
        res["passes"] = passes
        res["batches"] = len(loader)
        # DDP wrapper: attributes of the module fall through; gradients averaged
        torch.manual_seed(rank)  # different initial weights: DDP starts every rank from rank 0's
        net = Net()
        ddp = distributed.wrap_ddp(net, torch.device("cpu"), find_unused=False)
        res["grow"] = ddp.grow()
        x = torch.full((2, 4), float(rank + 1))
        ddp(x).sum().backward()
        res["grad"] = net.body.weight.grad.clone()
        res["weight"] = net.body.weight.detach().clone()
        # φ of a mask step: the branch trainer's gradient reduction
        grads = [torch.full((3,), float(rank)), torch.full((2, 2), float(rank) * 2)]
        distributed.average_gradients(grads)
        res["avg"] = [g.clone() for g in grads]
        nan = [torch.full((2,), float("nan") if rank == 1 else 1.0)]
        distributed.average_gradients(nan)
        res["nan"] = bool(torch.isnan(nan[0]).all())
        # ensure_same: rank 0's values everywhere
        other = nn.Linear(2, 2)
        with torch.no_grad():
            other.weight.fill_(rank)
        distributed.ensure_same(other, "a test network")
        res["synced"] = float(other.weight.sum())
        res["broadcast"] = distributed.broadcast_object({"rank": rank})
        out[rank] = res
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        return dict(out)


def test_sharded_loader_splits_every_pass_of_a_global_shuffle(two_ranks):
    a, b = two_ranks[0], two_ranks[1]
    assert a["batches"] == b["batches"] == 3  # 10 items, 5 per rank, batches of 2
    for p in range(2):
        assert len(a["passes"][p]) == len(b["passes"][p]) == 5
        assert sorted(a["passes"][p] + b["passes"][p]) == list(range(10))  # disjoint, everything once
    assert a["passes"][0] != a["passes"][1]  # set_epoch: a fresh shuffle in the next pass


def test_ddp_wrapper_averages_gradients_and_reaches_the_module(two_ranks):
    a, b = two_ranks[0], two_ranks[1]
    assert a["grow"] == b["grow"] == 4
    torch.testing.assert_close(a["weight"], b["weight"])  # rank 0's initial weights everywhere
    torch.testing.assert_close(a["grad"], b["grad"])
    torch.testing.assert_close(a["grad"], torch.full((3, 4), 3.0))  # mean over ranks of 2 x (1, 2)
    for ga, gb in zip(a["avg"], b["avg"]):
        assert torch.equal(ga, gb) and bool((ga == ga.flatten()[0]).all())
    assert float(a["avg"][0][0]) == 0.5 and float(a["avg"][1][0, 0]) == 1.0
    assert a["nan"] and b["nan"]  # a non-finite step on one rank is skipped by every rank
    assert a["synced"] == b["synced"] == 0.0
    assert a["broadcast"] == b["broadcast"] == {"rank": 0}


def test_mask_step_hands_phi_gradients_to_the_reduction_before_stepping():
    """``reduce_grads`` sees φ's gradients before the finiteness check, the clipping and the step:
    what it leaves there is the step (zeros: φ stays; a NaN from another rank: skipped)."""
    from test_bilevel import make_problem

    seen = []

    def zero(grads):
        seen.append([g.clone() for g in grads])
        for g in grads:
            g.zero_()

    def poison(grads):
        grads[0].fill_(float("nan"))

    net, paus, branch_fn, cil_loss, inner, outer, theta = make_problem()
    phi = list(paus.parameters())
    before = [p.detach().clone() for p in phi]
    opt = torch.optim.SGD(phi, lr=1.0)
    parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.1, phi, opt, BilevelSettings(factor=2), zero)
    assert parts["skipped"] == 0 and len(seen) == 1 and any(float(g.abs().sum()) > 0 for g in seen[0])
    assert all(torch.equal(a, p) for a, p in zip(before, phi))
    parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.1, phi, opt, BilevelSettings(factor=2), poison)
    assert parts["skipped"] == 1 and all(torch.equal(a, p) for a, p in zip(before, phi))
    parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, 0.1, phi, opt, BilevelSettings(factor=2))
    assert parts["skipped"] == 0 and any(not torch.equal(a, p) for a, p in zip(before, phi))


def test_other_ranks_open_no_log_file_and_print_only_warnings_and_their_digest_lines(tmp_path, capsys):
    import logging

    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        for h in list(root.handlers):
            root.removeHandler(h)
        log_file = tmp_path / "run.log"
        root.addHandler(logging.FileHandler(log_file))  # what an earlier basicConfig of this process left
        distributed.quiet_other_ranks(1)
        distributed.quiet_other_ranks(1)  # the next seed of the same run: nothing added twice
        assert not any(isinstance(h, logging.FileHandler) for h in root.handlers) and len(root.handlers) == 1
        pycil_log = tmp_path / "pycil.log"
        logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler(pycil_log)])  # PyCIL's: attaches nothing now
        log = logging.getLogger("cim_plugin.test")
        log.info("an info line of rank 1")
        log.info("a digest line", extra=distributed.for_every_rank())
        log.warning("a warning")
        out = capsys.readouterr().out
        assert "an info line" not in out
        assert "[rank 1] a digest line" in out and "[rank 1] a warning" in out
        assert log_file.read_text() == pycil_log.read_text() == ""
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
