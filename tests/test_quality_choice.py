"""The budget rule for the codec quality (core/quality_choice.py): the probe feels both quantity
and fidelity, and the rule keeps the highest quality that costs no accuracy."""

import pytest
import torch

from cim_plugin.core.quality_choice import choose_quality, probe_top1


def clusters(per_class: int, noise: float, seed: int, classes: int = 4, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.one_hot(torch.arange(classes), dim).double()
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g, dtype=torch.float64), labels


def test_probe_learns_separable_classes_and_not_shuffled_ones():
    xtr, ytr = clusters(30, 0.2, 0)
    xte, yte = clusters(50, 0.2, 1)
    assert probe_top1(xtr, ytr, xte, yte) > 95.0
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(2))]
    assert probe_top1(xtr, shuffled, xte, yte) < 60.0


def test_probe_gains_with_quantity_and_loses_with_blur():
    """The two sides of the trade-off: more exemplars help, corrupted exemplars hurt."""
    xte, yte = clusters(100, 0.6, 1)
    few = [probe_top1(*clusters(1, 0.6, s), xte, yte) for s in range(10, 20)]
    many = [probe_top1(*clusters(40, 0.6, s), xte, yte) for s in range(10, 20)]
    assert sum(many) / len(many) > sum(few) / len(few) + 5.0
    clean_x, y = clusters(40, 0.6, 3)
    blurred = 0.2 * clean_x + 0.8 * clean_x.mean(0)  # every exemplar pulled towards the same mean image
    blurred = blurred + 0.6 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert probe_top1(blurred, y, xte, yte) < probe_top1(clean_x, y, xte, yte) - 5.0


def test_probe_predicts_a_class_the_memory_lacks_as_never_right():
    xtr, ytr = clusters(20, 0.2, 0)
    keep = ytr != 3
    xte, yte = clusters(20, 0.2, 1)
    acc = probe_top1(xtr[keep], ytr[keep], xte, yte)
    assert acc <= 75.0 + 1e-9 and acc > 60.0


def test_probe_refuses_bad_shapes():
    x, y = clusters(5, 0.2, 0)
    with pytest.raises(ValueError, match="same d"):
        probe_top1(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="one label"):
        probe_top1(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="at least one"):
        probe_top1(x[:0], y[:0], x, y)


def test_rule_keeps_the_highest_quality_that_costs_no_accuracy():
    scores = {10: 80.0, 30: 81.0, 50: 80.5, 90: 75.0}
    assert choose_quality(scores, tolerance=1.0) == 50
    assert choose_quality(scores, tolerance=0.0) == 30
    assert choose_quality(scores, tolerance=10.0) == 90
    # a budget that holds every image either way: quantity buys nothing, the best fidelity wins
    assert choose_quality({10: 90.0, 50: 90.0, 90: 90.0}) == 90


def test_rule_refuses_nothing_scored_and_negative_tolerance():
    with pytest.raises(ValueError, match="no quality"):
        choose_quality({})
    with pytest.raises(ValueError, match="tolerance"):
        choose_quality({50: 1.0}, tolerance=-1)


def test_the_pilot_reads_its_runs_from_one_ablation_folder(tmp_path, monkeypatch):
    """benchmarks/quality_pilot.py --ablation: the variant's runs at each @quality and off, by their last checkpoint."""
    from pathlib import Path

    from cim_plugin import ablation
    from fakes import BASE, FakeRunner

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from quality_pilot import ablation_checkpoints

    config = {**BASE, "cim_checkpoint": True, "cim_codec_quality": 30}
    specs = ablation.plan([config], ["off", "mrdc", "mrdc@10", "mrdc@75", "pau"], [1])
    ablation.execute(specs, tmp_path, tmp_path, runner=FakeRunner())
    with pytest.raises(SystemExit, match="wrote no checkpoint .*task_1.pt"):
        ablation_checkpoints(tmp_path, "mrdc")
    for spec in specs:  # the fake runs have two phases: their last checkpoint is task_1.pt
        (tmp_path / f"{spec.name}_ckpt").mkdir(exist_ok=True)
        (tmp_path / f"{spec.name}_ckpt" / "task_1.pt").write_bytes(b"x")
    found = ablation_checkpoints(tmp_path, "mrdc")
    assert {k: Path(v).parent.name for k, v in found.items()} == {
        "off": "icarl_off_s1_ckpt", 30: "icarl_mrdc_s1_ckpt", 10: "icarl_mrdc@10_s1_ckpt", 75: "icarl_mrdc@75_s1_ckpt"}
    with pytest.raises(SystemExit, match="no finished run of pau\\+jpeg"):
        ablation_checkpoints(tmp_path, "pau+jpeg")
