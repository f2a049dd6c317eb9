"""PyCIL's own main.py with the plugin, on a tiny synthetic setting, for iCaRL, DER and FOSTER.

Needs a PyCIL checkout (PYCIL_ROOT, else the one `cim-plugin patch` recorded). The checkout is
cloned into a temporary folder and patched there; the user's checkout is never touched.
"""

import json
import re

import numpy as np
import pytest

from cim_plugin import locate
from fakes import TINY_RUN, MainRuns, assert_more_exemplars_in_no_more_bytes, results_of, run_main  # noqa: F401 (test_resume)
from pycil_checkout import require_pycil_root

PYCIL_ROOT = require_pycil_root()  # collection fails here under CI=true when no PyCIL is found

pytestmark = pytest.mark.pycil

TINY = {**TINY_RUN, "prefix": "tiny", "synthetic_image_size": 48, "synthetic_train_per_class": 16,
        "synthetic_test_per_class": 5, "memory_size": 32, "memory_per_class": 4, "convnet_type": "resnet18",
        "batch_size": 16}
LEARNER_KEYS = {
    "icarl": {"init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01},
    "der": {"init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01},
    "foster": {"beta1": 0.97, "beta2": 0.97, "oofc": "ft", "is_teacher_wa": False, "is_student_wa": False,
               "lambda_okd": 1, "wa_value": 1, "init_epochs": 1, "init_lr": 0.01, "init_weight_decay": 5e-4,
               "boosting_epochs": 1, "compression_epochs": 1, "lr": 0.01, "weight_decay": 5e-4, "T": 2},
    "lucir": {"convnet_type": "cosine_resnet18", "init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01},
}
CIM = {"cim": True, "cim_mask": "cam", "cam_update_interval": 1, "randombbxblur_prob_incre": 0.5,
       "cim_foster_old_count": "stored"}  # FOSTER only; the others do not read it


@pytest.fixture(scope="module")
def pycil(patched_pycil):
    """A patched clone of the user's PyCIL checkout (conftest's; recording nothing in the user's config)."""
    return patched_pycil


#: The runs this module's tests read, per learner: asking for one starts its learner's others beside it.
RUNS_PER_LEARNER = {"icarl": ("off", "cam", "pau"), "der": ("off", "cam", "pau"),
                    "foster": ("off", "cam", "pau"), "lucir": ("off", "pau")}


@pytest.fixture(scope="module")
def run(pycil, tmp_path_factory):
    """run(learner, variant) -> (completed process, results): each run made once per module, side by
    side with the learner's other runs (``MainRuns``: one torch thread each, one run per core)."""
    done = {}
    runs = MainRuns(pycil)
    cache = tmp_path_factory.mktemp("synthetic-cache")

    def _submit(learner, variant):
        tmp = tmp_path_factory.mktemp(f"{learner}-{variant}")
        config = {**TINY, **LEARNER_KEYS[learner], "model_name": learner, "data_root": str(cache), "prefix": variant}
        if variant != "off":
            config.update({**CIM, "cim_mask": variant})
        runs.submit((learner, variant), config, tmp, variant)

    def _run(learner, variant):
        if (learner, variant) not in done:
            # side by side runs may write the synthetic cache at once: its writes are atomic
            for other in (variant, *RUNS_PER_LEARNER.get(learner, ())):
                _submit(learner, other)
            proc = runs.result((learner, variant))
            done[learner, variant] = proc, results_of(proc, pycil)
        return done[learner, variant]

    return _run


@pytest.mark.parametrize("learner", ["icarl", "der", "foster"])
def test_cam_plugin_holds_more_exemplars_at_no_more_bytes(run, learner):
    _, off = run(learner, "off")
    on_proc, on = run(learner, "cam")
    assert [p["task"] for p in off["phases"]] == [0, 1] == [p["task"] for p in on["phases"]]
    assert off["cim"] is False and on["cim"] is True and on["cim_mask"] == "cam"
    assert_more_exemplars_in_no_more_bytes(off, on)
    for phase_on in on["phases"]:
        assert 0 < phase_on["memory"]["mean_box_area"] < 1
        assert 0 <= phase_on["cnn_top1"] <= 100 and phase_on["nme_top1"] is not None
    # the memory shrank with the per-class budget (32 // 5 = 6, then 32 // 8 = 4 units per class)
    assert off["phases"][0]["memory"]["units_per_class"] == 6 and off["phases"][1]["memory"]["units_per_class"] == 4
    assert all(v == 4 for v in off["phases"][1]["memory"]["exemplars_per_class"].values())
    # the log states the memory figures after every phase, and the augmentation ran
    assert on_proc.stdout.count("compressed memory:") == 2
    assert "compressed share now" in on_proc.stdout
    assert "CIM mask steps" not in on_proc.stdout  # no branch for "cam"


def test_foster_class_balance_counts_the_stored_exemplars_inside_pycil(run):
    """``cim_foster_old_count`` "stored" reaches FOSTER's own weights (models/foster.py computes them from
    ``samples_old_class``): both stages' weights are the effective-number weights of the stored count."""
    proc, on = run("foster", "cam")
    counts = [float(c) for c in re.findall(r"FOSTER class balance counts ([\d.]+) stored exemplars", proc.stdout)]
    assert len(counts) == 2 and counts[0] > 32 // 5  # boosting and compression stage, more than the budget
    assert counts[0] == pytest.approx(on["phases"][0]["memory"]["mean_exemplars_per_class"], abs=0.05)
    weights = [np.array(w.split(), dtype=float) for w in re.findall(r"per cls weights : \[([^\]]*)\]", proc.stdout)]
    assert len(weights) == 2
    beta, new = LEARNER_KEYS["foster"]["beta1"], TINY["synthetic_train_per_class"]
    eff = 1.0 - np.power(beta, [counts[0]] * 5 + [new] * 3)
    expected = (1.0 - beta) / eff
    for w in weights:
        assert w == pytest.approx(expected / expected.sum() * 8, rel=1e-3)


@pytest.mark.parametrize("learner", ["icarl", "der", "foster", "lucir"])
def test_pau_branch_trains_by_bilevel_steps_inside_pycil(run, learner):
    _, off = run(learner, "off")
    proc, pau = run(learner, "pau")
    assert pau["cim_mask"] == "pau" and len(pau["phases"]) == 2
    # num_meta_iters = new classes x 0.5 per epoch, fractions carried over the phase's epochs:
    # phase 0, 5 classes -> 2.5 -> 2 steps after its one epoch; phase 1, 3 classes -> 1.5 -> 1 step
    assert proc.stdout.count("CIM mask steps: 2 this epoch (2 in phase)") >= 1
    assert proc.stdout.count("CIM mask steps: 1 this epoch (1 in phase)") >= 1
    for phase_off, phase_pau in zip(off["phases"], pau["phases"]):
        assert phase_pau["memory"]["bytes_used"] <= phase_pau["memory"]["budget_bytes"] == phase_off["memory"]["budget_bytes"]
        assert phase_pau["memory"]["mean_exemplars_per_class"] > phase_off["memory"]["mean_exemplars_per_class"]


def test_bad_plugin_key_stops_the_run_before_training(pycil, tmp_path):
    bad = {**TINY, **LEARNER_KEYS["icarl"], "model_name": "icarl", "data_root": str(tmp_path),
           "cim": True, "compress_ratio": 3, "cim_maks": "cam"}
    proc = run_main(pycil, bad, tmp_path, "bad")
    assert proc.returncode != 0
    err = proc.stderr
    assert "'compress_ratio' = 3" in err and "'cim_maks'" in err and "did you mean 'cim_mask'" in err
    assert "Learning on" not in proc.stdout


def test_imagenet_style_folder_with_the_shipped_foster_cim_config(pycil, tmp_path):
    """exps/foster_cim.json (paper settings, path dataset) with a data root set, shrunk to CPU size."""
    from PIL import Image

    from cim_plugin.data.synthetic import SyntheticSpec, generate

    data = generate(SyntheticSpec(num_classes=6, image_size=64, train_per_class=3, test_per_class=1))
    root = tmp_path / "imagenet_like"
    for split, xs, ys in (("train", data.train_x, data.train_y), ("val", data.test_x, data.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / f"n{int(y):08d}"
            folder.mkdir(parents=True, exist_ok=True)
            # odd sizes and a grayscale file: the storage loader brings them all to 64 x 64 RGB
            img = Image.fromarray(x).resize((80 + 7 * (i % 3), 64 + 5 * (i % 2)))
            (img.convert("L") if i == 0 else img).save(folder / f"{i}.jpg")
    shipped = json.loads((locate.plugin_dir("exps") / "foster_cim.json").read_text())
    config = {**shipped, "data_root": str(root), "device": ["-1"], "seed": [1993], "init_cls": 5, "increment": 1,
              "memory_size": 12, "init_epochs": 1, "boosting_epochs": 1, "compression_epochs": 1, "batch_size": 8,
              "num_workers": 0, "cim_storage_size": 64, "init_lr": 0.01, "lr": 0.01, "prefix": "folder",
              "meta_batch_size": 4, "num_meta_iters_per_cls": 0.2}
    proc = run_main(pycil, config, tmp_path, "folder")
    res = results_of(proc, pycil)
    assert res["cim_mask"] == "pau" and len(res["phases"]) == 2
    mem = res["phases"][-1]["memory"]
    assert mem["storage_shape"] == [64, 64, 3] and mem["full_exemplar_bytes"] == 64 * 64 * 3
    assert mem["bytes_used"] <= mem["budget_bytes"] and mem["mean_exemplars_per_class"] >= 12 // 6


def test_results_hold_accuracy_matrix_forgetting_timings_and_gallery(run, pycil):
    import numpy as np

    from cim_plugin.figures import validate_gallery
    from cim_plugin.metrics import forgetting

    for variant in ("off", "cam"):
        _, res = run("icarl", variant)
        matrix = res["accuracy_matrix"]["cnn"]
        assert [len(row) for row in matrix] == [1, 2]
        # the per-task rows come from the same predictions as PyCIL's total: 5 and 3 classes x 5 test images
        for phase, row in zip(res["phases"], matrix):
            weights = [5, 3][: len(row)]
            total = sum(a * w for a, w in zip(row, weights)) / sum(weights)
            assert total == pytest.approx(phase["cnn_top1"], abs=0.02)
        assert matrix[0][0] == pytest.approx(res["phases"][0]["cnn_top1"], abs=0.01)
        summary = res["summary"]
        assert summary["forgetting_cnn"] == forgetting(matrix)
        assert summary["forgetting_nme"] == forgetting(res["accuracy_matrix"]["nme"])
        assert summary["last_cnn_top1"] == res["phases"][-1]["cnn_top1"]
        assert summary["units_used"] <= summary["budget_units"] and summary["exemplars_per_class"]
        assert res["config"]["model_name"] == "icarl" and res["results_version"] == 2
    _, cam = run("icarl", "cam")
    assert set(cam["summary"]["cim_seconds"]) >= {"memory", "box_refresh"}
    assert all("cim_seconds" in p for p in cam["phases"])
    gallery_path = pycil / cam["log_file"].replace(".log", "_gallery.npz")
    with np.load(gallery_path) as data:
        gallery = validate_gallery({k: data[k] for k in data.files})
    labels = gallery["labels"].tolist()
    assert labels == list(range(8))  # every class of the run (cim_gallery default 16)
    assert gallery["originals"].shape == gallery["reconstructions"].shape == (8, 48, 48, 3)
    assert not np.isnan(gallery["cams"].astype(np.float32)).any() and gallery["source"] == "cam"
    # the reconstruction equals the original inside the box, and is blockier outside it
    (y0, y1, x0, x1), orig, rec = gallery["boxes"][0], gallery["originals"][0], gallery["reconstructions"][0]
    assert (rec[y0:y1, x0:x1] == orig[y0:y1, x0:x1]).all()


def test_ablation_runner_runs_resumes_and_reports(pycil, tmp_path, capsys):
    from cim_plugin import ablation

    config = {**TINY, **LEARNER_KEYS["icarl"], "model_name": "icarl", "data_root": str(tmp_path / "cache"),
              "cam_update_interval": 1, "randombbxblur_prob_incre": 0.5}
    path = tmp_path / "icarl.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "ablation"
    outcome, written = ablation.run_ablation([path], ["off", "random", "oracle"], [5], out, root=pycil, jobs=2)
    assert outcome == {"skipped": [], "ran": ["icarl_off_s5", "icarl_random_s5", "icarl_oracle_s5"], "failed": []}
    # side by side: a variant starts once off has logged its phase-0 checkpoint, before off ends
    printed = capsys.readouterr().out
    assert "up to 2 runs at a time" in printed
    assert printed.index("icarl_random_s5 started") < printed.index("icarl_off_s5 done")
    assert {"aggregate.md", "aggregate.csv", "runs.csv", "accuracy_per_phase.png", "exemplars_vs_bytes.png",
            "gallery_icarl_random.png"} <= set(written)
    res = json.loads((out / "runs" / "icarl_random_s5" / "results.json").read_text())
    assert res["cim_mask"] == "random" and res["seed"] == 5 and res["ablation"]["variant"] == "random"
    # shared first phase: the variants start from off's phase-0 model (same phase-0 accuracy)
    off = json.loads((out / "runs" / "icarl_off_s5" / "results.json").read_text())
    oracle = json.loads((out / "runs" / "icarl_oracle_s5" / "results.json").read_text())
    assert res["ablation"]["shared_first_phase"] is True and (out / "runs" / "icarl_off_s5" / "first_phase.pt").is_file()
    assert res["phases"][0]["cnn_top1"] == off["phases"][0]["cnn_top1"] == oracle["phases"][0]["cnn_top1"]
    assert res["summary"]["first_phase_from"].endswith("first_phase.pt")
    # diagnostics on the synthetic set: the oracle keeps every object whole
    stored = [p["diagnostics"]["stored"] for p in oracle["phases"]]
    assert all(s["mean_box_recall"] == 1.0 and 0 < s["mean_box_area"] < 1 and s["psnr_db"] > 0 for s in stored)
    curve = res["phases"][0]["diagnostics"]["tau_curve"]
    assert [round(r["tau"], 1) for r in curve] == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert "| later phases CNN |" in (out / "aggregate.md").read_text()
    md = (out / "aggregate.md").read_text()
    assert "| icarl | off | 1 |" in md and "| icarl | random | 1 |" in md
    # a run killed half-way (no finished results) runs again; the finished one is skipped
    (out / "runs" / "icarl_random_s5" / "results.json").unlink()
    outcome, _ = ablation.run_ablation([path], ["off", "random"], [5], out, root=pycil, figures=False)
    assert outcome == {"skipped": ["icarl_off_s5"], "ran": ["icarl_random_s5"], "failed": []}
    assert "ran 1, skipped 1 already finished, failed 0" in capsys.readouterr().out
    # the off run writes checkpoints: run again, it restores its phases instead of training them
    (out / "runs" / "icarl_off_s5" / "results.json").unlink()
    outcome, _ = ablation.run_ablation([path], ["off"], [5], out, root=pycil, figures=False)
    assert outcome["ran"] == ["icarl_off_s5"]
    log = (out / "runs" / "icarl_off_s5" / "pycil.log").read_text()
    assert "cim-plugin: resumed task 0" in log and "cim-plugin: resumed task 1" in log
    again = json.loads((out / "runs" / "icarl_off_s5" / "results.json").read_text())
    assert [p["cnn_top1"] for p in again["phases"]] == [p["cnn_top1"] for p in off["phases"]]
    assert (out / "runs" / "icarl_off_s5" / "first_phase.pt").is_file()


def test_a_jpeg_coded_memory_trains_checkpoints_and_resumes_inside_pycil(pycil, tmp_path):
    """DER with CIM boxes and JPEG-coded pixels: the memory counts its real bytes within the budget,
    and a run resumed from its checkpoints restores the coded memory and the same accuracies."""
    config = {**TINY, **LEARNER_KEYS["der"], **CIM, "model_name": "der", "data_root": str(tmp_path / "cache"),
              "prefix": "jpeg", "cim_codec": "jpeg", "cim_checkpoint": True}
    first = results_of(run_main(pycil, config, tmp_path, "first"), pycil)
    for phase in first["phases"]:
        memory = phase["memory"]
        assert memory["kind"] == "coded" and 0 < memory["bytes_used"] <= memory["budget_bytes"]
        assert memory["bytes_per_exemplar"]["max"] < memory["full_exemplar_bytes"]
        assert memory["mean_exemplars_per_class"] > memory["units_per_class"]  # more than plain exemplars
    proc = run_main(pycil, {**config, "cim_resume": True}, tmp_path, "again")
    again = results_of(proc, pycil)
    assert proc.stdout.count("resumed task") == 2
    assert [p["cnn_top1"] for p in again["phases"]] == [p["cnn_top1"] for p in first["phases"]]
    assert again["phases"][-1]["memory"] == first["phases"][-1]["memory"]
