"""Continual-learning figures of one run: per-task accuracy, accuracy matrix, forgetting.

Pure functions on arrays (no PyCIL, no torch). Classes are PyCIL's mapped labels: task 0 holds
labels ``[0, init_cls)``, task ``t >= 1`` holds ``[init_cls + (t-1)*increment, init_cls + t*increment)``.

The accuracy matrix ``A`` is lower-triangular: ``A[i][j]`` is the top-1 accuracy (percent) on the
test images of task ``j`` after training phase ``i`` (``j <= i``). Forgetting after phase ``T`` is
PyCIL's definition: the mean over old tasks ``j < T`` of ``max_{j <= i < T} A[i][j] - A[T][j]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def task_of_labels(labels: np.ndarray, init_cls: int, increment: int) -> np.ndarray:
    """Task index of every (mapped) label."""
    if init_cls < 1 or increment < 1:
        raise ValueError(f"init_cls and increment must be >= 1, got {init_cls} and {increment}")
    labels = np.asarray(labels, dtype=np.int64)
    later = 1 + (labels - init_cls) // increment
    return np.where(labels < init_cls, 0, later)


def per_task_accuracy(pred: np.ndarray, true: np.ndarray, init_cls: int, increment: int, n_tasks: int) -> list[float | None]:
    """Top-1 accuracy (percent, 2 decimals) on each of the first ``n_tasks`` tasks; None for a
    task without test images. ``pred`` may be ``[N]`` or PyCIL's ``[N, topk]`` (column 0 is top-1)."""
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred[:, 0]
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"predictions {pred.shape} and labels {true.shape} differ in shape")
    tasks = task_of_labels(true, init_cls, increment)
    correct = pred == true
    out: list[float | None] = []
    for t in range(n_tasks):
        sel = tasks == t
        out.append(round(100.0 * float(correct[sel].mean()), 2) if sel.any() else None)
    return out


def forgetting(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Mean forgetting of the old tasks after the last phase (None before a second phase)."""
    if len(matrix) < 2:
        return None
    last = matrix[-1]
    drops = []
    for j in range(len(matrix) - 1):
        earlier = [row[j] for row in matrix[j:-1] if j < len(row) and row[j] is not None]
        if earlier and j < len(last) and last[j] is not None:
            drops.append(max(earlier) - last[j])
    return round(float(np.mean(drops)), 4) if drops else None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (ddof 1: the spread a reader compares differences
    against; ddof 0 understates it by a factor sqrt(2/3), about a fifth, at 3 seeds) of the values that are not None, and their
    count. One value has std 0.0."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)
