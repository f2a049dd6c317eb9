"""Shared by the benchmarks that need a trained network: the network of a phase-0 checkpoint and
the synthetic set's images of its classes, normalised as PyCIL's synthetic set is (mean 0.5, std 0.25)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cim_plugin.data.synthetic import SyntheticSpec, load_synthetic

#: PyCIL's transforms for the synthetic set (pycil/data.py ``synthetic_idata``): Normalize(0.5, 0.25).
MEAN, STD = 0.5, 0.25


@dataclass
class FirstPhase:
    net: torch.nn.Module
    images: np.ndarray  # uint8 [n, H, W, 3] of the first phase's classes
    labels: torch.Tensor  # int64 [n]: the network's class indices
    boxes: np.ndarray  # int64 [n, 4]: true object boxes
    run: dict | None = None  # the run's PyCIL config, as the checkpoint recorded it
    plugin: dict | None = None  # the plugin's saved state, still encoded (``checkpoint.decode`` reads it)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of a box diagnostic on trained checkpoints: the checkpoints, ``--pycil``,
    ``--size``, ``--images`` (training images of the checkpoint's classes, as many of each) and
    ``--factor`` (the side factor of compress_ratio)."""
    parser.add_argument("checkpoints", nargs="+", help="first_phase.pt / task_<n>.pt files")
    parser.add_argument("--pycil", default=os.environ.get("PYCIL_ROOT"), help="PyCIL checkout (default: PYCIL_ROOT)")
    parser.add_argument("--size", type=int, default=128, help="image side of the run's synthetic set")
    parser.add_argument("--images", type=int, default=300,
                        help="training images of the checkpoint's classes, as many of each")
    parser.add_argument("--factor", type=int, default=8, help="side factor of compress_ratio (64 -> 8)")
    return parser


def per_class(labels: torch.Tensor | np.ndarray, total: int) -> torch.Tensor:
    """Indices of about ``total`` items, the same number (the first ones) of every class present: the
    synthetic set is ordered by class, so its first ``total`` items would be one or two classes."""
    labels = torch.as_tensor(np.asarray(labels))
    classes = labels.unique()
    per = max(1, total // len(classes))
    return torch.cat([(labels == c).nonzero().flatten()[:per] for c in classes])


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def load(checkpoint: str, pycil: str | None, split: str, size: int = 128, limit: int | None = None,
         data_seed: int = 0) -> FirstPhase:
    """The checkpoint's network (eval mode) and the ``split`` ("train" or "test") images of its classes
    (``limit``: about that many, as many of every class, ``per_class``; before 2026-12-05 the first
    ``limit`` images, i.e. one or two classes).
    ``data_seed``: the synthetic generator's seed (0: the run's own set; another value draws fresh
    images of the same classes, which neither the run's training nor its test set contains)."""
    pycil = pycil or os.environ.get("PYCIL_ROOT")
    if not pycil:
        raise SystemExit("give --pycil or set PYCIL_ROOT: the checkpoint holds PyCIL's network classes")
    sys.path.insert(0, pycil)
    from utils.factory import get_model  # PyCIL's

    from cim_plugin.pycil import checkpoint as ckpt

    payload = ckpt.read_checkpoint(Path(checkpoint), "cpu", True, f"cannot read checkpoint {checkpoint}")
    args = {**payload["run"], "device": [torch.device("cpu")]}
    learner = get_model(args["model_name"], args)  # a fresh learner of the setting: its recipe rebuilds the network
    net = ckpt.network_from_payload(payload, learner).eval()
    known = net.fc.weight.shape[0] if hasattr(net.fc, "weight") else None
    class_order = np.asarray(payload["class_order"], dtype=np.int64)
    rank = np.empty(int(class_order.max()) + 1, dtype=np.int64)
    rank[class_order] = np.arange(len(class_order))  # dataset label -> the network's class index
    run = payload["run"]  # the run's own set: its colour mode and sizes (before 2026-12-02: class colours, 60 / 20)
    data = load_synthetic(SyntheticSpec(num_classes=len(class_order), image_size=size,
                                        train_per_class=int(run.get("synthetic_train_per_class", 60)),
                                        test_per_class=int(run.get("synthetic_test_per_class", 20)),
                                        colour=str(run.get("synthetic_colour", "class")), seed=data_seed))
    x, y, b = (data.train_x, data.train_y, data.train_boxes) if split == "train" else (data.test_x, data.test_y, data.test_boxes)
    keep = np.flatnonzero(rank[y] < known) if known is not None else np.arange(len(y))
    if limit is not None:
        keep = keep[per_class(y[keep], limit).numpy()]
    return FirstPhase(net, x[keep], torch.from_numpy(rank[y[keep]]), b[keep], dict(run),
                      payload.get("plugin"))


def outputs(net: torch.nn.Module, images: np.ndarray, key: str = "logits", batch: int = 64) -> torch.Tensor:
    """``net(x)[key]`` of uint8 ``images``, normalised as PyCIL's synthetic set, in batches, no grad."""
    with torch.no_grad():
        return torch.cat([net(normalise(images[s: s + batch]))[key] for s in range(0, len(images), batch)])


def predictions(net: torch.nn.Module, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Predicted class of each uint8 image, in batches."""
    return outputs(net, images, "logits", batch).argmax(1)


def backbone(net: torch.nn.Module) -> torch.nn.Module:
    """The backbone whose last map gives the CAM: ``convnet``, or FOSTER's newest of ``convnets``."""
    return net.convnet if hasattr(net, "convnet") else net.convnets[-1]


def features(net: torch.nn.Module, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """The network's penultimate features (``net(x)["features"]``) of uint8 ``images``, in batches."""
    return outputs(net, images, "features", batch)


def top1(net: torch.nn.Module, images: np.ndarray, labels: torch.Tensor, batch: int = 64) -> float:
    """Top-1 (%) of ``net`` on uint8 ``images``, normalised as PyCIL's synthetic set, in batches."""
    return 100.0 * float((predictions(net, images, batch) == labels).float().mean())
