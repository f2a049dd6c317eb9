"""How cim-plugin finds PyCIL and its own folders (cim_plugin.locate), and the CLI cases that need
no PyCIL checkout. Runs everywhere: only temporary folders, never the user's config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cim_plugin
from cim_plugin import cli, locate

REPO = Path(cim_plugin.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No PYCIL_ROOT, and a home and config folder of the test's own."""
    monkeypatch.delenv("PYCIL_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def fake_pycil(path: Path, missing=()) -> Path:
    """A folder that looks like PyCIL (main.py, trainer.py, models/base.py), minus ``missing``."""
    for rel in ("main.py", "trainer.py", "models/base.py"):
        if rel not in missing:
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text("# fake\n")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------ config_file


def test_config_file_follows_xdg_config_home(tmp_path):
    assert locate.config_file() == tmp_path / "xdg" / "cim-plugin" / "config.json"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_config_file_defaults_to_home_config(tmp_path, monkeypatch, xdg):
    if xdg is None:
        monkeypatch.delenv("XDG_CONFIG_HOME")
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg)  # empty or relative: invalid per the XDG spec
    assert locate.config_file() == tmp_path / "home" / ".config" / "cim-plugin" / "config.json"


# ------------------------------------------------------------------------ record_pycil_root


def test_record_writes_absolute_path_and_nothing_else(tmp_path, monkeypatch):
    root = fake_pycil(tmp_path / "PyCIL")
    monkeypatch.chdir(tmp_path)
    written = locate.record_pycil_root("PyCIL")  # relative: must be stored absolute
    assert written == locate.config_file()
    assert json.loads(written.read_text()) == {"pycil_root": str(root.resolve())}
    assert sorted(p.name for p in written.parent.iterdir()) == ["config.json"]  # no temp file left


def test_record_replaces_root_keeps_other_keys_and_mends_bad_file(tmp_path):
    cfg = locate.config_file()
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"pycil_root": "/old", "other": 1}))
    locate.record_pycil_root(tmp_path / "new")
    assert json.loads(cfg.read_text()) == {"pycil_root": str(tmp_path / "new"), "other": 1}
    cfg.write_text("{not json")
    locate.record_pycil_root(tmp_path / "newer")
    assert json.loads(cfg.read_text()) == {"pycil_root": str(tmp_path / "newer")}


# ------------------------------------------------------------------------- find_pycil_root


def test_nothing_found_says_what_to_do(tmp_path):
    root, reason = locate.find_pycil_root()
    assert root is None
    assert reason == (
        "PyCIL not found: set PYCIL_ROOT to a PyCIL checkout or run `cim-plugin patch "
        "/path/to/PyCIL` (no PYCIL_ROOT set, no recorded checkout in "
        f"{tmp_path / 'xdg' / 'cim-plugin' / 'config.json'})."
    )


def test_reason_shows_home_config_as_tilde(monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME")
    _, reason = locate.find_pycil_root()
    assert "no recorded checkout in ~/.config/cim-plugin/config.json)" in reason


def test_env_var_found(tmp_path, monkeypatch):
    root = fake_pycil(tmp_path / "PyCIL")
    monkeypatch.setenv("PYCIL_ROOT", str(root))
    assert locate.find_pycil_root() == (root.resolve(), "")


def test_recorded_root_found(tmp_path):
    root = fake_pycil(tmp_path / "PyCIL")
    locate.record_pycil_root(root)
    assert locate.find_pycil_root() == (root.resolve(), "")


def test_env_var_takes_precedence_over_recorded(tmp_path, monkeypatch):
    recorded = fake_pycil(tmp_path / "recorded")
    env = fake_pycil(tmp_path / "env")
    locate.record_pycil_root(recorded)
    monkeypatch.setenv("PYCIL_ROOT", str(env))
    assert locate.find_pycil_root() == (env.resolve(), "")


def test_empty_env_var_counts_as_unset(tmp_path, monkeypatch):
    recorded = fake_pycil(tmp_path / "recorded")
    locate.record_pycil_root(recorded)
    monkeypatch.setenv("PYCIL_ROOT", "")
    assert locate.find_pycil_root() == (recorded.resolve(), "")


def test_invalid_env_var_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    locate.record_pycil_root(fake_pycil(tmp_path / "recorded"))  # valid, but must not be used
    monkeypatch.setenv("PYCIL_ROOT", str(tmp_path / "nope"))
    root, reason = locate.find_pycil_root()
    assert root is None
    assert reason.startswith(f"PyCIL not found: PYCIL_ROOT is set to {tmp_path / 'nope'}, ")
    assert "it does not exist" in reason
    assert "unset it" in reason


def test_env_var_missing_pycil_files_are_named(tmp_path, monkeypatch):
    bad = fake_pycil(tmp_path / "half", missing=("trainer.py", "models/base.py"))
    monkeypatch.setenv("PYCIL_ROOT", str(bad))
    root, reason = locate.find_pycil_root()
    assert root is None
    assert "PYCIL_ROOT" in reason
    assert "does not look like a PyCIL checkout (missing trainer.py, models/base.py)" in reason
    assert "main.py" not in reason.split("missing")[1]


def test_env_var_pointing_at_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("PYCIL_ROOT", str(tmp_path / "file"))
    root, reason = locate.find_pycil_root()
    assert root is None and "it is not a directory" in reason


def test_recorded_root_gone(tmp_path):
    gone = fake_pycil(tmp_path / "PyCIL")
    locate.record_pycil_root(gone)
    (gone / "main.py").unlink()
    root, reason = locate.find_pycil_root()
    assert root is None
    assert f"the checkout recorded in {locate.config_file()} is {gone}" in reason
    assert "(missing main.py)" in reason
    assert "cim-plugin patch" in reason


def test_unreadable_config_gives_a_reason(tmp_path):
    cfg = locate.config_file()
    cfg.parent.mkdir(parents=True)
    cfg.write_text("[1, 2]")
    root, reason = locate.find_pycil_root()
    assert root is None
    assert reason.startswith("PyCIL not found: set PYCIL_ROOT")
    assert "does not hold a JSON object" in reason


# ---------------------------------------------------------------------- is_patched, plugin_dir


def test_is_patched(tmp_path):
    root = fake_pycil(tmp_path / "PyCIL")
    assert not locate.is_patched(root)
    (root / "utils").mkdir()
    (root / "utils" / "plugin_hook.py").write_text("")
    assert not locate.is_patched(root)  # the hook file alone is not enough
    (root / "trainer.py").write_text("    plugin_hook.before_run(args)\n")
    assert locate.is_patched(root)
    assert not locate.is_patched(tmp_path / "missing")


@pytest.mark.parametrize("name", ["patches", "exps"])
def test_plugin_dir_is_in_the_clone(name):
    assert locate.plugin_dir(name) == REPO / name


def test_plugin_dir_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown plugin folder"):
        locate.plugin_dir("models")


def test_plugin_dir_absent_in_a_plain_install(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"  # what a non-editable install looks like
    (site / "cim_plugin").mkdir(parents=True)
    monkeypatch.setattr(locate, "plugin_repo", lambda: site)
    with pytest.raises(FileNotFoundError, match=r"pip install -e"):
        locate.plugin_dir("patches")


# ------------------------------------------------------------------- CLI cases without PyCIL


def test_where_without_pycil(capsys):
    assert cli.main(["where"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("PyCIL not found: set PYCIL_ROOT")


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.write_text("x"), "is not a directory"),
        (lambda d: d.mkdir(), "does not look like a PyCIL checkout (missing main.py, trainer.py, "
                              "models/base.py)"),
    ],
    ids=["missing", "file", "not-pycil"],
)
def test_patch_refuses_bad_dirs(tmp_path, capsys, setup, expected):
    target = tmp_path / "PyCIL"
    setup(target)
    assert cli.main(["patch", str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("cim-plugin patch: error: ")
    assert expected in err
    assert not locate.config_file().exists()


def test_patch_refuses_a_copy_without_git(tmp_path, capsys):
    root = fake_pycil(tmp_path / "PyCIL")
    assert cli.main(["patch", str(root)]) == 2
    err = capsys.readouterr().err
    # /tmp is normally outside any git repository; accept the other refusal if it is not
    assert "is not a git checkout" in err or "is inside the git repository" in err
    assert "git clone https://github.com/G-U-N/PyCIL" in err or "own" in err


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert cli.main(["patch"]) == 2
    assert "PYCIL_DIR" in capsys.readouterr().err


def test_module_entry_point_runs_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    ok = subprocess.run([sys.executable, "-m", "cim_plugin.cli", "--help"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0
    assert "patch" in ok.stdout and "where" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cim_plugin.cli", "patch", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "does not exist" in bad.stderr
