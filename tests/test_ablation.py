"""The ablation runner without PyCIL: planning, resuming, failures, aggregation (a fake runner
stands in for PyCIL's main.py; the real runner is tested in test_pycil_integration.py)."""

import csv
import io
import json
import threading
from pathlib import Path

import pytest

from cim_plugin import ablation, ablation_report
from cim_plugin.launch import available_cores

from fakes import BASE, FakeRunner


def test_variant_config_changes_only_the_switches_seed_and_prefix():
    cfg = ablation.variant_config(BASE, "off", 7)
    assert cfg["cim"] is False and cfg["seed"] == [7] and cfg["prefix"].startswith("ablation_off_")
    changed = {k for k in BASE if BASE[k] != cfg.get(k)}
    assert changed == {"cim", "seed", "prefix"}
    cam = ablation.variant_config(BASE, "cam", 7)
    assert cam["cim"] is True and cam["cim_mask"] == "cam" and cam["memory_size"] == BASE["memory_size"]
    assert BASE["cim_mask"] == "pau"  # the base is not modified
    with pytest.raises(ablation.AblationError, match="unknown variant 'jpeg'"):
        ablation.variant_config(BASE, "jpeg", 1)


def test_the_prefix_separates_settings_so_pycil_files_are_never_shared(tmp_path):
    # PyCIL names logs, results and checkpoints by prefix + seed + backbone: two ablations of
    # different settings (same learner, variant, seed) must not write the same files
    a = ablation.variant_config(BASE, "off", 7, tmp_path / "a" / "first_phase.pt")
    assert a["prefix"] == ablation.variant_config(BASE, "off", 7, tmp_path / "a" / "first_phase.pt")["prefix"]
    other = ablation.variant_config({**BASE, "memory_size": 30}, "off", 7, tmp_path / "a" / "first_phase.pt")
    assert other["prefix"] != a["prefix"] and other["prefix"].startswith("ablation_off_")
    cam1 = ablation.variant_config(BASE, "cam", 7, tmp_path / "a" / "first_phase.pt")
    cam2 = ablation.variant_config(BASE, "cam", 7, tmp_path / "b" / "first_phase.pt")
    assert cam1["prefix"] != cam2["prefix"]  # started from another ablation's first phase
    assert ablation.variant_config(BASE, "off", 8)["prefix"] != ablation.variant_config(BASE, "off", 7)["prefix"]


def test_a_run_that_writes_checkpoints_resumes_from_them_when_run_again(tmp_path):
    off = ablation.variant_config(BASE, "off", 7, tmp_path / "first_phase.pt")
    cam = ablation.variant_config(BASE, "cam", 7, tmp_path / "first_phase.pt")
    assert off["cim_checkpoint"] is True and off["cim_resume"] is True and "cim_resume" not in cam
    assert ablation.variant_config({**BASE, "cim_checkpoint": True}, "cam", 7)["cim_resume"] is True
    # how a run is resumed is not part of its setting: same tag, and a finished run of a folder made
    # before the key was set is still done
    assert ablation.config_tag(off) == ablation.config_tag({k: v for k, v in off.items() if k != "cim_resume"})
    spec = ablation.plan([BASE], ["off"], [7], shared_first_phase_in=tmp_path)[0]
    ablation.execute([spec], tmp_path, tmp_path, runner=FakeRunner())
    saved = tmp_path / "runs" / spec.name / "config.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "cim_resume"}))
    assert ablation.run_state(tmp_path / "runs" / spec.name, spec.config) == "done"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "memory_size": 1}))
    assert ablation.run_state(tmp_path / "runs" / spec.name, spec.config) == "stale"


def test_plan_orders_learner_variant_seed_and_rejects_duplicates():
    der = {**BASE, "model_name": "DER"}
    specs = ablation.plan([BASE, der], ["pau", "off", "cam"], [2, 1])
    assert [s.name for s in specs[:6]] == ["icarl_off_s2", "icarl_off_s1", "icarl_cam_s2", "icarl_cam_s1",
                                           "icarl_pau_s2", "icarl_pau_s1"]
    assert specs[-1].name == "der_pau_s1" and len(specs) == 12
    with pytest.raises(ablation.AblationError, match="icarl given more than once"):
        ablation.plan([BASE, BASE], ["off"], [1])
    with pytest.raises(ablation.AblationError, match="must not repeat"):
        ablation.plan([BASE], ["off", "off"], [1])
    with pytest.raises(ablation.AblationError, match="seed -1"):
        ablation.plan([BASE], ["off"], [-1])


def test_check_plan_names_the_run_and_the_bad_key():
    bad = {**BASE, "compress_ratio": 3}
    with pytest.raises(ablation.AblationError, match=r"icarl_cam_s1: .*'compress_ratio' = 3"):
        ablation.check_plan(ablation.plan([bad], ["cam"], [1]))


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ablation.AblationError, match="nowhere.json not found"):
        ablation.load_config(tmp_path / "nowhere.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ablation.AblationError, match="broken.json:1:2: not valid JSON"):
        ablation.load_config(broken)
    nameless = tmp_path / "nameless.json"
    nameless.write_text(json.dumps({"dataset": "cifar100"}))
    with pytest.raises(ablation.AblationError, match="no string 'model_name'"):
        ablation.load_config(nameless)
    (tmp_path / "pycil" / "exps").mkdir(parents=True)
    (tmp_path / "pycil" / "exps" / "x.json").write_text(json.dumps(BASE))
    assert ablation.load_config("exps/x.json", tmp_path / "pycil")["model_name"] == "icarl"


def test_execute_resumes_skips_finished_and_reruns_crashed(tmp_path):
    specs = ablation.plan([BASE], ["off", "cam"], [1, 2])
    runner = FakeRunner(fail={"icarl_cam_s2"})
    out = ablation.execute(specs, tmp_path, tmp_path, runner=runner)
    assert out == {"skipped": [], "ran": ["icarl_off_s1", "icarl_off_s2", "icarl_cam_s1"], "failed": ["icarl_cam_s2"]}
    assert not (tmp_path / "runs" / "icarl_cam_s2" / "results.json").exists()
    saved = json.loads((tmp_path / "runs" / "icarl_off_s1" / "results.json").read_text())
    assert saved["ablation"] == {"learner": "icarl", "variant": "off", "seed": 1, "shared_first_phase": False, "launcher_wall_s": 1.0,
                                 "pycil_results_file": str(tmp_path / "icarl_off_s1_results.json")}
    # a killed run leaves a results.json that is not finished: it runs again, the others are skipped
    (tmp_path / "runs" / "icarl_off_s2" / "results.json").write_text(json.dumps({"finished": False}))
    runner = FakeRunner()
    out = ablation.execute(specs, tmp_path, tmp_path, runner=runner)
    assert runner.calls == ["icarl_off_s2", "icarl_cam_s2"]
    assert out["skipped"] == ["icarl_off_s1", "icarl_cam_s1"] and out["failed"] == []


def test_finished_runs_of_another_config_are_not_mixed_in(tmp_path):
    ablation.execute(ablation.plan([BASE], ["off"], [1]), tmp_path, tmp_path, runner=FakeRunner())
    changed = ablation.plan([{**BASE, "memory_size": 30}], ["off"], [1])
    with pytest.raises(ablation.AblationError, match="made with another config .*icarl_off_s1.*--force"):
        ablation.execute(changed, tmp_path, tmp_path, runner=FakeRunner())
    runner = FakeRunner()
    ablation.execute(changed, tmp_path, tmp_path, force=True, runner=runner)
    assert runner.calls == ["icarl_off_s1"]
    assert json.loads((tmp_path / "runs" / "icarl_off_s1" / "config.json").read_text())["memory_size"] == 30


def test_report_aggregates_mean_and_std_over_seeds(tmp_path):
    specs = ablation.plan([BASE], ["off", "cam", "pau"], [1, 3])
    ablation.execute(specs, tmp_path, tmp_path, runner=FakeRunner())
    written = ablation_report.report(tmp_path, figures=True)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "aggregate.csv").read_text())))
    assert [(r["learner"], r["variant"], r["n_seeds"]) for r in rows] == [("icarl", "off", "2"), ("icarl", "cam", "2"), ("icarl", "pau", "2")]
    # avg inc. CNN of seed s: 50 + plus + s - 5 -> off 46 / 48, cam 56 / 58, pau 66 / 68
    assert [float(r["avg_incremental_cnn_top1_mean"]) for r in rows] == [47.0, 57.0, 67.0]
    assert [float(r["avg_incremental_cnn_top1_std"]) for r in rows] == [1.4142, 1.4142, 1.4142]  # sample std of 46, 48
    assert [float(r["exemplar_ratio_vs_off"]) for r in rows] == [1.0, 2.0, 2.0]
    assert [float(r["wall_ratio_vs_off"]) for r in rows] == [1.0, 2.0, 2.0]
    md = (tmp_path / "aggregate.md").read_text()
    assert "| icarl | pau | 2 | 67.00 ± 1.41 |" in md
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))) == 6
    assert (tmp_path / "figures" / "accuracy_per_phase.png").stat().st_size > 1000
    assert "exemplars_vs_bytes.png" in written


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(ablation.AblationError, match="no finished runs"):
        ablation_report.report(tmp_path)


def test_cli_ablate_reports_a_missing_config_plainly(tmp_path, monkeypatch, capsys):
    from cim_plugin import cli, locate

    monkeypatch.setattr(locate, "find_pycil_root", lambda: (tmp_path, ""))
    monkeypatch.setattr(locate, "is_patched", lambda root: True)
    code = cli.main(["ablate", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "cim-plugin ablate: error: config file" in capsys.readouterr().err


def test_tables_list_learners_in_the_plugin_order_then_variants(tmp_path):
    der, other = {**BASE, "model_name": "der"}, {**BASE, "model_name": "wa"}
    ablation.execute(ablation.plan([other, der, BASE], ["pau", "off"], [1]), tmp_path, tmp_path, runner=FakeRunner())
    rows = ablation_report.aggregate(ablation_report.collect(tmp_path))
    assert [(r["learner"], r["variant"]) for r in rows] == [
        ("icarl", "off"), ("icarl", "pau"), ("der", "off"), ("der", "pau"), ("wa", "off"), ("wa", "pau")]


def test_shared_first_phase_off_writes_it_and_the_variants_start_from_it(tmp_path):
    specs = ablation.plan([BASE], ["cam", "off"], [1, 2], shared_first_phase_in=tmp_path)
    by = {s.name: s.config for s in specs}
    assert [s.name for s in specs][:2] == ["icarl_off_s1", "icarl_off_s2"]  # off first: it trains phase 0
    assert by["icarl_off_s1"]["cim_checkpoint"] is True and "cim_first_phase_from" not in by["icarl_off_s1"]
    first = tmp_path.resolve() / "runs" / "icarl_off_s2" / ablation.FIRST_PHASE_FILE
    assert by["icarl_cam_s2"]["cim_first_phase_from"] == str(first)
    full = {**BASE, "shuffle": True, "convnet_type": "resnet18", "device": ["-1"]}
    ablation.check_plan(ablation.plan([full], ["cam", "off"], [1], shared_first_phase_in=tmp_path))  # file not there yet: fine
    out = ablation.execute(specs, tmp_path, tmp_path, runner=FakeRunner())
    assert out["failed"] == [] and first.read_bytes() == b"phase 0 of icarl_off_s2"
    saved = json.loads((tmp_path / "runs" / "icarl_cam_s1" / "results.json").read_text())
    assert saved["ablation"]["shared_first_phase"] is True
    with pytest.raises(ablation.AblationError, match="'off' variant"):
        ablation.plan([BASE], ["cam"], [1], shared_first_phase_in=tmp_path)


def test_shared_first_phase_off_without_checkpoint_is_a_failed_run(tmp_path):
    class NoCheckpoint(FakeRunner):
        def __call__(self, root, config_path, log_path, echo, **options):
            config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "cim_checkpoint": False}))
            return super().__call__(root, config_path, log_path, echo)

    specs = ablation.plan([BASE], ["off"], [1], shared_first_phase_in=tmp_path)
    out = ablation.execute(specs, tmp_path, tmp_path, runner=NoCheckpoint())
    assert out["failed"] == ["icarl_off_s1"]


def test_gain_table_splits_first_and_later_phases_against_off(tmp_path):
    ablation.execute(ablation.plan([BASE], ["off", "cam"], [1, 2]), tmp_path, tmp_path, runner=FakeRunner())
    table = ablation_report.gain_table(ablation_report.aggregate(ablation_report.collect(tmp_path)))
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["cam"][2] == "61.50 ± 0.71" and rows["cam"][4] == "+10.00 ± 0.00 (n=2)"  # later phases: 51.5 vs 41.5, per seed
    assert rows["off"][4] == "–"


def test_phase_table_gives_old_and_new_class_accuracy_per_phase(tmp_path):
    class OldNew(FakeRunner):
        def __call__(self, root, config_path, log_path, echo, **options):
            out, wall = super().__call__(root, config_path, log_path, echo)
            results = json.loads(out.read_text())
            seed = json.loads(config_path.read_text())["seed"][0]
            results["phases"][1].update(cnn_old_top1=10.0 * seed, cnn_new_top1=80.0)
            out.write_text(json.dumps(results))
            return out, wall

    ablation.execute(ablation.plan([BASE], ["off"], [1, 2]), tmp_path, tmp_path, runner=OldNew())
    table = ablation_report.phase_table(ablation_report.collect(tmp_path))
    assert table.splitlines()[0] == "| learner | variant | phase 1 old / new |"
    assert table.splitlines()[2] == "| icarl | off | 15.0 / 80.0 |"


# ----------------------------------------------------------------- runs side by side (--jobs)

SHARED_LINE = "2026-12-03 [checkpoint.py] => cim-plugin: checkpoint of task 0 written to {} (state sha256 abc)\n"


class Pipelined(FakeRunner):
    """off logs its phase-0 checkpoint, then waits (up to 10 s) for a variant to start before it ends."""

    def __init__(self, fail_after_phase0=()):
        super().__init__()
        self.variant_started, self.fail_after_phase0 = threading.Event(), set(fail_after_phase0)
        self.overlapped, self.seen, self.options = {}, {}, {}

    def __call__(self, root, config_path, log_path, echo, **options):
        config = json.loads(Path(config_path).read_text())
        name = Path(config_path).parent.name
        self.options[name] = options
        if config.get("cim_checkpoint"):
            ckpt = Path(root) / f"{name}_ckpt" / "task_0.pt"
            ckpt.parent.mkdir(exist_ok=True)
            ckpt.write_bytes(f"phase 0 of {name}".encode())
            echo(SHARED_LINE.format(ckpt.relative_to(root)))
            self.overlapped[name] = self.variant_started.wait(10)
            if name in self.fail_after_phase0:
                raise ablation.RunError(f"{name} crashed in phase 1")
        else:
            self.variant_started.set()
            self.seen[name] = Path(config["cim_first_phase_from"]).read_bytes()
        return super().__call__(root, config_path, log_path, echo)


def test_side_by_side_a_variant_starts_once_off_has_shared_its_first_phase(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner = Pipelined()
    specs = ablation.plan([BASE], ["cam", "off"], [1], shared_first_phase_in=tmp_path)
    out = ablation.execute(specs, tmp_path, tmp_path, runner=runner, jobs=2)
    assert out == {"skipped": [], "ran": ["icarl_off_s1", "icarl_cam_s1"], "failed": []}
    assert runner.overlapped == {"icarl_off_s1": True}  # cam ran while off was still running
    assert runner.seen == {"icarl_cam_s1": b"phase 0 of icarl_off_s1"}
    cores = available_cores()
    assert runner.options["icarl_cam_s1"]["env"] == {"OMP_NUM_THREADS": str(max(1, cores // 2)),
                                                     "MKL_NUM_THREADS": str(max(1, cores // 2))}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert ablation.run_threads(2) == {}


def test_one_at_a_time_a_variant_waits_for_the_whole_off_run(tmp_path):
    runner = Pipelined()
    runner.variant_started.set()  # off would wait 10 s for a variant that cannot start before it ends
    out = ablation.execute(ablation.plan([BASE], ["cam", "off"], [1], shared_first_phase_in=tmp_path), tmp_path,
                           tmp_path, runner=runner)
    assert out["ran"] == ["icarl_off_s1", "icarl_cam_s1"] and runner.calls == ["icarl_off_s1", "icarl_cam_s1"]
    assert runner.options["icarl_off_s1"]["env"] == {}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_variant_whose_off_run_failed_before_its_first_phase_fails_without_running(tmp_path, jobs):
    runner = FakeRunner(fail={"icarl_off_s1"})
    specs = ablation.plan([BASE], ["cam", "off"], [1, 2], shared_first_phase_in=tmp_path)
    out = ablation.execute(specs, tmp_path, tmp_path, runner=runner, jobs=jobs)
    assert sorted(out["failed"]) == ["icarl_cam_s1", "icarl_off_s1"]
    assert sorted(out["ran"]) == ["icarl_cam_s2", "icarl_off_s2"] and "icarl_cam_s1" not in runner.calls


def test_a_variant_runs_when_its_off_run_fails_after_sharing_the_first_phase(tmp_path):
    runner = Pipelined(fail_after_phase0={"icarl_off_s1"})
    specs = ablation.plan([BASE], ["cam", "off"], [1], shared_first_phase_in=tmp_path)
    out = ablation.execute(specs, tmp_path, tmp_path, runner=runner, jobs=2)
    assert out["failed"] == ["icarl_off_s1"] and out["ran"] == ["icarl_cam_s1"]
    assert runner.seen == {"icarl_cam_s1": b"phase 0 of icarl_off_s1"}


def test_jobs_must_be_a_positive_integer(tmp_path, capsys):
    with pytest.raises(ablation.AblationError, match="jobs must be an integer >= 1, got 0"):
        ablation.execute(ablation.plan([BASE], ["off"], [1]), tmp_path, tmp_path, runner=FakeRunner(), jobs=0)
    from cim_plugin import cli

    assert cli.main(["ablate", "x.json", "--jobs", "0"]) == 2
    assert "--jobs takes an integer >= 1, got '0'" in capsys.readouterr().err


# --------------------------------------------------- first phases of another ablation


def test_every_run_starts_from_another_ablations_first_phases(tmp_path, capsys):
    first = tmp_path / "first"
    ablation.execute(ablation.plan([BASE], ["off"], [1, 2], shared_first_phase_in=first), first, tmp_path,
                     runner=FakeRunner())
    smaller = {**BASE, "memory_size": 20}
    specs = ablation.plan([smaller], ["cam", "off"], [1, 2], first_phase_from=first)
    for spec in specs:  # off too; nothing here writes or waits for a first phase
        assert spec.config["cim_first_phase_from"] == str((first / "runs" / f"icarl_off_s{spec.seed}" / "first_phase.pt").resolve())
        assert "cim_checkpoint" not in spec.config
    runner = Pipelined()  # a variant would wait 10 s for an off run that never shares
    runner.variant_started.set()
    out = ablation.execute(specs, tmp_path / "second", tmp_path, runner=runner, jobs=2)
    assert out["failed"] == [] and len(out["ran"]) == 4
    assert ablation.first_phase_differences([smaller], first) == ["icarl: memory_size 60 -> 20"]
    assert ablation.first_phase_differences([BASE], first) == []


def test_first_phases_from_another_ablation_must_be_there(tmp_path):
    with pytest.raises(ablation.AblationError, match=r"no first phase in .* for 2 learner/seed pair\(s\): .*icarl_off_s1/first_phase.pt"):
        ablation.plan([BASE], ["cam"], [1, 2], first_phase_from=tmp_path)
    with pytest.raises(ablation.AblationError, match="either trained here"):
        ablation.plan([BASE], ["off"], [1], shared_first_phase_in=tmp_path, first_phase_from=tmp_path)


def test_first_phases_from_another_ablation_are_refused_with_independent_runs_or_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "patched_pycil_root", lambda root: tmp_path)
    path = tmp_path / "icarl.json"
    path.write_text(json.dumps(BASE))
    with pytest.raises(ablation.AblationError, match="independent runs train their own first phases"):
        ablation.run_ablation([path], ["off"], [1], tmp_path / "out", shared_first_phase=False, first_phase_from=tmp_path)
    with pytest.raises(ablation.AblationError, match="another ablation's folder than"):
        ablation.run_ablation([path], ["off"], [1], tmp_path / "out", first_phase_from=tmp_path / "out")


def test_checkpoints_flag_plans_the_runs_a_json_with_cim_checkpoint_plans(tmp_path, monkeypatch):
    # the quality pilot reads every run's last checkpoint: --checkpoints must give exactly the runs
    # (names, PyCIL prefixes, configs) that "cim_checkpoint": true in the JSON gives, so folders made
    # either way are the same ablation
    monkeypatch.setattr(ablation, "patched_pycil_root", lambda root: tmp_path)
    monkeypatch.setattr(ablation, "check_plan", lambda specs: None)  # BASE is not a whole PyCIL config
    planned = []
    monkeypatch.setattr(ablation, "execute", lambda specs, out, root, **kw: planned.append(specs)
                        or {"ran": [], "skipped": [], "failed": []})
    plain, keyed = tmp_path / "plain.json", tmp_path / "keyed.json"
    plain.write_text(json.dumps(BASE))
    keyed.write_text(json.dumps({**BASE, "cim_checkpoint": True}))
    variants = ["off", "mrdc@30", "cam"]
    for config, flag in ((plain, True), (keyed, False), (plain, False)):  # one output folder, planned three ways
        ablation.run_ablation([config], variants, [1], tmp_path / "out", checkpoints=flag, figures=False)
    flag, json_, none = planned
    assert [s.config for s in flag] == [s.config for s in json_]
    assert all(s.config["cim_checkpoint"] is True and s.config["cim_resume"] is True for s in flag)
    assert [s.config.get("cim_checkpoint") for s in none] == [True, None, None]  # only off shares its first phase


def test_pair_table_gives_every_two_variants_paired_by_seed(tmp_path):
    ablation.execute(ablation.plan([BASE], ["off", "cam"], [1, 2]), tmp_path, tmp_path, runner=FakeRunner())
    ablation.execute(ablation.plan([BASE], ["pau"], [2]), tmp_path, tmp_path, runner=FakeRunner())
    lines = ablation_report.pair_table(ablation_report.collect(tmp_path)).splitlines()
    assert lines[2:] == [
        "| icarl | cam − off | 1 2 | +10.00, +10.00 | +10.00 ± 0.00 | 2 of 2 | +0.00, +0.00 | +0.00 ± 0.00 | 0 of 2 |",
        "| icarl | pau − off | 2 | +20.00 | +20.00 | 1 of 1 | +0.00 | +0.00 | 0 of 1 |",
        "| icarl | pau − cam | 2 | +10.00 | +10.00 | 1 of 1 | +0.00 | +0.00 | 0 of 1 |",
    ]
    assert "| icarl | pau − cam |" in ablation_report.report(tmp_path, figures=False)["aggregate.md"].read_text()


def test_cli_ablate_passes_jobs_and_first_phases_through(monkeypatch):
    from cim_plugin import cli

    seen = {}

    def fake_run_ablation(configs, variants, seeds, out, **options):
        seen.update(options, variants=variants)
        return {"skipped": [], "ran": [], "failed": []}, {}

    monkeypatch.setattr(ablation, "run_ablation", fake_run_ablation)
    assert cli.main(["ablate", "x.json", "--variants", "off", "mrdc@30", "--jobs", "3", "--first-phase-from", "earlier"]) == 0
    assert seen["jobs"] == 3 and seen["first_phase_from"] == "earlier" and seen["variants"] == ["off", "mrdc@30"]
    assert seen["checkpoints"] is False
    assert cli.main(["ablate", "x.json", "--checkpoints"]) == 0 and seen["checkpoints"] is True
    assert cli.main(["ablate", "x.json", "--variants", "pau@30"]) == 2  # a quality needs a codec


def test_the_progress_bar_shows_where_each_run_is(tmp_path, capsys):
    assert ablation.run_progress("Task 1, Epoch 3/12 => Loss 0.711, Train_accy 62.67:  25%|") == "task 1 epoch 3/12"
    assert ablation.run_progress("SNet: Task 2, Epoch 4/4 => Loss 1.0") == "task 2 epoch 4/4 (compression)"
    assert ablation.run_progress("cim-plugin: memory of 5 classes") is None

    class Epochs(FakeRunner):
        def __call__(self, root, config_path, log_path, echo, **options):
            echo("Task 0, Epoch 7/20 => Loss 0.5, Train_accy 50.00\n")
            return super().__call__(root, config_path, log_path, echo)

    ablation.execute(ablation.plan([BASE], ["off"], [1]), tmp_path, tmp_path, runner=Epochs())
    assert "icarl_off_s1 task 0 epoch 7/20" in capsys.readouterr().err


def test_an_unfinished_run_is_not_resumed_under_another_pycil_checkout(tmp_path):
    # PyCIL keeps a run's resume checkpoints under its own logs/: run again from another checkout, an
    # off run would silently train its first phase again (and drop the shared copy); refused instead
    first, second = tmp_path / "pycil_a", tmp_path / "pycil_b"
    first.mkdir(), second.mkdir()
    out = tmp_path / "abl"
    specs = ablation.plan([BASE], ["off", "cam"], [1], shared_first_phase_in=out)
    assert specs[0].config["cim_resume"] is True and "cim_resume" not in specs[1].config
    got = ablation.execute(specs, out, first, runner=FakeRunner(fail={"icarl_off_s1"}))
    assert got["failed"] == ["icarl_off_s1", "icarl_cam_s1"]
    assert ablation.resume_root(out / "runs" / "icarl_off_s1") == first.resolve()
    runner = FakeRunner()
    with pytest.raises(ablation.AblationError, match=r"icarl_off_s1 \(PyCIL at .*pycil_a\).*Set PYCIL_ROOT"):
        ablation.execute(specs, out, second, runner=runner)
    assert runner.calls == [] and (out / "runs" / "icarl_off_s1" / "config.json").is_file()
    got = ablation.execute(specs, out, first, runner=runner)  # from the checkout it ran in: resumed
    assert got["ran"] == ["icarl_off_s1", "icarl_cam_s1"] and got["failed"] == []
    # finished runs do not care where they ran; a run without resume checkpoints starts anew anywhere
    assert ablation.execute(specs, out, second, runner=FakeRunner())["skipped"] == ["icarl_off_s1", "icarl_cam_s1"]
