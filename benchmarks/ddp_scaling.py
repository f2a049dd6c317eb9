"""Benchmark: training throughput under torchrun, 1 process against N (one per GPU), and the scaling efficiency.

The plugin's DDP path (``cim_plugin/distributed.py``, as ``pycil/ddp.py`` uses it in a run): each
process joins the group with ``distributed.setup`` (nccl on GPUs, gloo with ``--device cpu``),
reads its share of every epoch's global shuffle through ``distributed.sharded_loader`` and trains a
torchvision resnet18 wrapped by ``distributed.wrap_ddp`` (SGD, momentum 0.9, cross-entropy) on
random uint8 images at ``--image-size`` px, ``--batch`` per process (PyCIL's ``batch_size`` is per
process under torchrun), converted to float on the device as PyCIL's transforms would. After
``--warmup`` steps, ``--steps`` steps are timed (device synchronised) on every rank.

For each world size (1 and ``--gpus``) this script starts ``torchrun --standalone
--nproc_per_node <n>`` on itself and prints

    processes | images/s (all) | images/s per process | scaling efficiency

where the efficiency is (images/s per process with N) / (images/s with 1): 1.0 is perfect
scaling; what is lost is the gradient all-reduce not hidden behind the backward pass, and the
loader. It has not been run on GPUs yet (none was lent when it was written); on CPU it runs as a
smoke test: ``python benchmarks/ddp_scaling.py --device cpu --gpus 2 --image-size 32 --batch 8
--steps 3 --warmup 1``.

Run (one node with N GPUs): ``python benchmarks/ddp_scaling.py --gpus N [--batch 64]
[--image-size 224] [--steps 50] [--warmup 10] [--find-unused]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="processes of the N run (default: every visible GPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=64, help="images per process and step")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=1024, help="images in the synthetic set (cycled)")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--find-unused", action="store_true", help="find_unused_parameters, as DER/FOSTER/LUCIR runs use")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # the JSON a worker writes
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    from cim_plugin import distributed

    use_cuda = args.device == "cuda"
    if distributed.launched():
        device = distributed.setup(use_cuda)
    else:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (args.images,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=True, drop_last=True,
                        pin_memory=use_cuda)
    loader = distributed.sharded_loader(loader, distributed.shard_seed())
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=args.classes).to(device)
    model = distributed.wrap_ddp(net, device, find_unused=args.find_unused)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def batches():
        while True:
            yield from loader

    def sync():
        if use_cuda:
            torch.cuda.synchronize(device)

    it = batches()
    model.train()
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            distributed.barrier()
            t0 = time.perf_counter()
        x, y = next(it)
        x = (x.to(device, non_blocking=True).float() - mean) / std
        y = y.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    seconds = time.perf_counter() - t0
    rates = distributed.all_gather_object(args.steps * args.batch / seconds)
    if distributed.is_main():
        name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
        args.worker.write_text(json.dumps({"processes": distributed.world_size(), "per_rank": rates, "name": name}))
    if distributed.active():
        torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, n: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
           "--worker", str(out), "--device", args.device, "--batch", str(args.batch), "--image-size", str(args.image_size),
           "--classes", str(args.classes), "--images", str(args.images), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--find-unused"] if args.find_unused else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker is not None:
        worker(args)
        return
    n = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < n):
        raise SystemExit(f"needs {n} visible GPU(s), {torch.cuda.device_count()} found (or use --device cpu)")
    if n < 2:
        raise SystemExit("scaling needs at least 2 processes (--gpus 2 or more)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, n):
            res = launch(args, world, Path(tmp) / f"w{world}.json")
            total = sum(res["per_rank"])
            rows.append((world, total, total / world, res["name"]))
    base = rows[0][2]
    print(f"\nresnet18, {args.image_size} px, batch {args.batch} per process, {args.steps} timed steps, {rows[0][3]}")
    print("| processes | images/s (all) | images/s per process | scaling efficiency |")
    print("|---|---|---|---|")
    for world, total, per, _ in rows:
        print(f"| {world} | {total:,.1f} | {per:,.1f} | {per / base:.2f} |")


if __name__ == "__main__":
    main()
