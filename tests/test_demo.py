"""The demo's comparison table, from runs made by the ablation runner with a fake PyCIL."""

from cim_plugin import ablation, ablation_report, demo
from fakes import BASE, FakeRunner


def test_demo_comparison_names_the_gain_and_the_shared_first_phase(tmp_path):
    specs = ablation.plan([BASE], ["off", "pau"], [1993], shared_first_phase_in=tmp_path)
    ablation.execute(specs, tmp_path, tmp_path, runner=FakeRunner())
    table = demo.comparison_table(ablation_report.collect(tmp_path))
    lines = table.splitlines()
    assert lines[2].startswith("| icarl | off | 2043.0 / 2033.0 |") and lines[3].startswith("| icarl | pau | 2063.0 / 2053.0 |")
    assert "icarl pau: +20.00 points average incremental CNN vs off (same first-phase model" in table
    assert "2.00x exemplars per class at 1,000 / 1,200 bytes" in table


def test_demo_config_is_the_shipped_cim_file():
    path = demo.demo_config("icarl")
    assert path.name == "icarl_cim_demo.json" and path.is_file()


def test_each_off_demo_config_trains_as_its_cim_twin():
    """``exps/<learner>_off_demo.json`` (plugin off, for PyCIL's own main.py) must differ from the
    demo's ``<learner>_cim_demo.json`` only in plugin keys and the prefix, or an on/off comparison
    made with the pair compares two settings."""
    import json

    from cim_plugin.config import PLUGIN_KEYS

    exps = demo.demo_config("icarl").parent
    for cim in sorted(exps.glob("*_cim_demo.json")):
        off = cim.with_name(cim.name.replace("_cim_demo", "_off_demo"))
        a, b = json.loads(cim.read_text()), json.loads(off.read_text())
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in PLUGIN_KEYS and k != "prefix")
        assert differ == [], f"{off.name} vs {cim.name}"
        assert b.get("cim", False) is False
