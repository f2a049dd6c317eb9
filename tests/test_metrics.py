"""Per-task accuracy, forgetting and mean/std of cim_plugin.metrics."""

import numpy as np
import pytest

from cim_plugin.metrics import forgetting, mean_std, per_task_accuracy, task_of_labels


def test_task_of_labels_follows_init_cls_then_increment():
    assert task_of_labels(np.arange(12), 5, 3).tolist() == [0] * 5 + [1] * 3 + [2] * 3 + [3]


def test_per_task_accuracy_counts_top1_per_task():
    true = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    pred = np.array([[0, 9], [9, 1], [2, 0], [3, 3], [0, 4], [5, 5], [0, 6], [7, 7]])  # PyCIL's [N, topk]
    # task 0 = labels 0..4: right on 0, 2, 3 -> 60 %; task 1 = 5..7: right on 5, 7 -> 66.67 %; task 2: no images
    assert per_task_accuracy(pred, true, 5, 3, 3) == [60.0, 66.67, None]
    assert per_task_accuracy(pred[:, 0], true, 5, 3, 1) == [60.0]


def test_per_task_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        per_task_accuracy(np.zeros(3), np.zeros(4), 2, 2, 1)
    with pytest.raises(ValueError, match="init_cls"):
        task_of_labels(np.zeros(2), 0, 2)


def test_forgetting_is_best_earlier_minus_last_averaged_over_old_tasks():
    matrix = [[80.0], [70.0, 90.0], [60.0, 50.0, 95.0]]
    # task 0: max(80, 70) - 60 = 20; task 1: 90 - 50 = 40 -> 30
    assert forgetting(matrix) == 30.0
    assert forgetting([[80.0]]) is None
    assert forgetting([[80.0], [85.0, 70.0]]) == -5.0  # backward transfer shows as negative forgetting
    assert forgetting([[None], [50.0, 70.0]]) is None  # no earlier value for task 0


def test_mean_std_skips_missing_values():
    assert mean_std([1.0, None, 3.0]) == pytest.approx((2.0, 2.0 ** 0.5, 2))  # sample std (ddof 1)
    assert mean_std([4.0]) == (4.0, 0.0, 1)
    assert mean_std([None]) == (None, None, 0)
