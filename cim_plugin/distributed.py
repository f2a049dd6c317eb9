"""Several processes under ``torchrun``: one process per device, one memory, rank 0 writes.

No PyCIL imports: the adapter (``pycil/ddp.py``) uses these from PyCIL's seams.

- ``launched()`` / ``env_ranks()``: whether the process was started by torchrun with a world of
  more than one process (``WORLD_SIZE`` > 1), and its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
- ``setup(use_cuda)``: the process group (nccl on GPUs, gloo on CPUs, ``env://``: torchrun's
  ``MASTER_ADDR``/``MASTER_PORT``) and this rank's device (``cuda:LOCAL_RANK`` or the CPU);
- ``rank()``, ``world_size()``, ``is_main()``: 0, 1 and True without a process group;
- ``broadcast_object`` (rank 0's value everywhere), ``all_gather_object``, ``sync_module``
  (rank 0's parameters and buffers everywhere), ``ensure_same`` (the same, with a warning when the
  ranks' parameters differed), ``average_gradients`` (one flat all-reduce);
- ``wrap_ddp``: a ``DistributedDataParallel`` whose attributes fall through to the module it holds
  (PyCIL's training loops reach ``convnets``, ``weight_align``... on the network they train);
- ``sharded_loader``: the same loader, each rank reading its share of every epoch's fresh global
  shuffle (``EpochDistributedSampler``: ``set_epoch`` before every pass; equal batch counts);
- ``quiet_other_ranks``: ranks other than 0 write no log file and print only warnings and the
  lines meant for every rank (``for_every_rank``).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

log = logging.getLogger(__name__)

#: The variables torchrun sets for every process (and that ``setup`` reads).
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: How long a collective waits for the other ranks: the others wait while rank 0 alone builds a
#: phase's memory (at ImageNet scale, minutes). A rank that fails makes torchrun stop the others.
TIMEOUT = datetime.timedelta(hours=2)


class DistributedError(RuntimeError):
    """A setting that cannot work with several processes (the message says which and what to do)."""


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set: start the run with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name} = {raw!r} is not an integer") from None


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started a world of several processes."""
    try:
        return _env_int("WORLD_SIZE", 1) > 1
    except DistributedError:
        return False


def env_ranks() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from the environment (LOCAL_RANK defaults to RANK)."""
    rank_, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK", rank_)
    if not 0 <= rank_ < world:
        raise DistributedError(f"RANK {rank_} is not in [0, WORLD_SIZE {world})")
    return rank_, world, local


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(use_cuda: bool) -> torch.device:
    """Join the process group (once per process; later calls return the device) and return this
    rank's device: ``cuda:LOCAL_RANK`` with nccl when ``use_cuda``, else the CPU with gloo."""
    rank_, world, local = env_ranks()
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError("the config asks for GPUs but CUDA is not available: set \"device\": [\"-1\"] for CPU (gloo)")
        count = torch.cuda.device_count()
        if local >= count:
            raise DistributedError(f"LOCAL_RANK {local} but only {count} GPU(s) are visible on this node: start at most "
                                   f"{count} processes per node (torchrun --nproc_per_node {count})")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group(backend, rank=rank_, world_size=world, timeout=TIMEOUT, **kwargs)
        log.info("cim-plugin DDP: rank %d of %d (local rank %d), backend %s, device %s", rank_, world, local, backend, device)
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; the object itself without a process group)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def sync_module(module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers copied into every rank's ``module``."""
    if not active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for t in tensors:
        dist.broadcast(t.data, src=0)


def tensors_digest(tensors) -> str:
    """sha256 of the tensors' dtypes, sizes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{flat.dtype}{flat.numel()}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def ensure_same(module: nn.Module, what: str) -> None:
    """Every rank ends with rank 0's parameters and buffers of ``module``. The parameters should be
    equal already (DDP averages the gradients, every rank steps the same optimiser): when their
    sha256 differ between the ranks, a warning names ``what`` and the ranks' digests."""
    if not active():
        return
    digests = all_gather_object(tensors_digest(module.parameters()))
    if len(set(digests)) > 1:
        log.warning("cim-plugin DDP: %s differed between the ranks (sha256 by rank: %s); rank 0's copied to all",
                    what, [d[:12] for d in digests])
    sync_module(module)


@torch.no_grad()
def average_gradients(grads: Sequence[torch.Tensor]) -> None:
    """Every rank's ``grads`` replaced, in place, by their mean over the ranks (one all-reduce of
    one flat buffer; a NaN on one rank reaches all, so that a step is skipped everywhere or nowhere)."""
    if not active() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


class TransparentDDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose unknown attributes are the wrapped module's (``update_fc``,
    ``convnets``, ``weight_align``...): a training loop written for the bare network runs unchanged."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool = True) -> nn.Module:
    """``module`` wrapped for its training steps (gradients averaged over the ranks, rank 0's
    buffers broadcast before each forward); the module itself without a process group.
    ``find_unused``: the loss may leave some trained parameters without a gradient (an extra
    traversal of the autograd graph per step; without it DDP stops at the next step)."""
    if not active() or isinstance(module, nn.parallel.DistributedDataParallel):
        return module
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return TransparentDDP(module, device_ids=ids, find_unused_parameters=find_unused)


class EpochDistributedSampler(DistributedSampler):
    """A DistributedSampler that starts a new epoch (``set_epoch``) at every pass over it: each
    pass is a fresh global shuffle (seed + pass number) split into equal shares (padded by
    repeating the first indices, as DistributedSampler does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = 0

    def __iter__(self):
        self.set_epoch(self.passes)
        self.passes += 1
        return super().__iter__()


def shard_seed() -> int:
    """A seed for the samplers of one stage, drawn from rank 0's torch generator and shared."""
    return int(broadcast_object(int(torch.randint(0, 2**31 - 1, ()).item())))


def sharded_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` with each rank reading its share (same dataset, batch size, workers, collate)."""
    if not active() or isinstance(loader.sampler, DistributedSampler):
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = EpochDistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers if loader.num_workers else False)


# -------------------------------------------------------------------------------------- logging

EVERY_RANK = "cim_every_rank"


def for_every_rank() -> dict:
    """``extra`` for a log call that every rank prints (``log.info(..., extra=for_every_rank())``)."""
    return {EVERY_RANK: True}


class _OtherRankFilter(logging.Filter):
    def __init__(self, rank_: int):
        super().__init__()
        self.prefix = f"[rank {rank_}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not getattr(record, EVERY_RANK, False):
            return False
        if not getattr(record, "_cim_rank_prefixed", False):
            record.msg, record._cim_rank_prefixed = self.prefix + str(record.msg), True
        return True


def quiet_other_ranks(rank_: int) -> None:
    """On a rank other than 0, before PyCIL configures logging: the root logger gets a stream
    handler that prints only warnings and ``for_every_rank`` lines, prefixed ``[rank r]``. PyCIL's
    ``basicConfig`` then attaches nothing (its FileHandler opens the file, but this rank writes no
    line to it)."""
    if rank_ == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    if any(isinstance(f, _OtherRankFilter) for h in root.handlers for f in h.filters):
        return  # the next seed of the same run: set up already
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(filename)s] => %(message)s"))
    handler.addFilter(_OtherRankFilter(rank_))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
