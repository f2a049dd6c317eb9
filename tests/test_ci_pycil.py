"""CI runs the PyCIL-backed tests: `.ci/run` gives them PyCIL (PYCIL_ROOT, else a temporary clone of
the bundle, .ci/with-pycil.sh) or fails, and under CI=true a test that finds no PyCIL fails instead
of being skipped (tests/pycil_checkout.py). Nothing here installs anything or runs the suite: pip and
python are recording fakes wherever `.ci/run` is run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cim_plugin
from cim_plugin import PYCIL_COMMIT
from fakes import recording_commands

REPO = Path(cim_plugin.__file__).resolve().parent.parent
TESTS = REPO / "tests"
WITH_PYCIL = REPO / ".ci" / "with-pycil.sh"
BUNDLE = REPO.parent / "shared" / "pycil" / "PyCIL.bundle"

NEEDS_PYCIL = '''
from pycil_checkout import require_pycil_root

ROOT = require_pycil_root()


def test_uses_pycil():
    assert ROOT.is_dir()
'''


def readme_test_command() -> str:
    """The command in the README's "Run the tests" code block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("**Run the tests**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.count("\n") == 1, f"the README's test command is not one line: {block!r}"
    return block.strip()


def run_pytest_on_module_needing_pycil(tmp_path, env) -> subprocess.CompletedProcess:
    (tmp_path / "test_needs_pycil.py").write_text(NEEDS_PYCIL)
    env = {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "test_needs_pycil.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_missing_pycil_fails_the_test_module_in_ci(tmp_path, no_pycil_env, ci):
    proc = run_pytest_on_module_needing_pycil(tmp_path, {**no_pycil_env, "CI": ci})
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 5), out
    assert "PyCIL not found" in out and "CI=true: the PyCIL-backed tests must run" in out, out
    summary = out.strip().splitlines()[-1]
    assert "1 error" in summary and "skipped" not in summary and "passed" not in summary, out


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_missing_pycil_skips_the_test_module_outside_ci(tmp_path, no_pycil_env, ci):
    env = no_pycil_env if ci is None else {**no_pycil_env, "CI": ci}
    proc = run_pytest_on_module_needing_pycil(tmp_path, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 5), out  # 5: nothing but the skipped module collected
    assert "SKIPPED [1] test_needs_pycil.py:4: PyCIL not found: set PYCIL_ROOT" in out, out


def test_found_pycil_runs_the_test_module_in_ci(tmp_path, no_pycil_env):
    root = tmp_path / "PyCIL"
    for rel in ("main.py", "trainer.py", "models/base.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("# fake\n")
    proc = run_pytest_on_module_needing_pycil(tmp_path, {**no_pycil_env, "CI": "true", "PYCIL_ROOT": str(root)})
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr


def test_with_pycil_fails_clearly_without_pycil_root_or_bundle(tmp_path, no_pycil_env):
    missing = tmp_path / "nowhere" / "PyCIL.bundle"
    proc = subprocess.run(["bash", str(WITH_PYCIL), "touch", str(tmp_path / "ran")], cwd=tmp_path,
                          env={**no_pycil_env, "CIM_PYCIL_BUNDLE": str(missing)}, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "error: no PyCIL for the PyCIL-backed tests: PYCIL_ROOT is not set and the PyCIL bundle " \
           f"{missing} does not exist." in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_with_pycil_passes_a_given_pycil_root_on_unchanged(tmp_path, no_pycil_env):
    given = tmp_path / "my PyCIL"
    proc = subprocess.run(["bash", str(WITH_PYCIL), "sh", "-c", 'printf %s "$PYCIL_ROOT"'], cwd=tmp_path,
                          env={**no_pycil_env, "PYCIL_ROOT": str(given),
                               "CIM_PYCIL_BUNDLE": str(tmp_path / "missing.bundle")},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == str(given)


def test_with_pycil_clones_the_bundle_at_the_pinned_commit_and_removes_it(tmp_path, no_pycil_env):
    if not BUNDLE.is_file():
        pytest.skip(f"no PyCIL bundle at {BUNDLE}")
    script = ('echo "$PYCIL_ROOT"; git -C "$PYCIL_ROOT" rev-parse HEAD; test -f "$PYCIL_ROOT/trainer.py" && echo ok; '
              'git -C "$PYCIL_ROOT" status --porcelain; exit 3')
    proc = subprocess.run(["bash", str(WITH_PYCIL), "sh", "-c", script], cwd=tmp_path, env=no_pycil_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the command's status comes back
    root, head, ok, *changes = proc.stdout.splitlines()
    assert (head, ok, changes) == (PYCIL_COMMIT, "ok", [])  # the pinned commit, unpatched
    root = Path(root)
    assert root.name == "PyCIL" and REPO not in root.parents
    assert not root.exists() and not root.parent.exists()  # the temporary folder is gone


def ci_run(tmp_path, env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`bash .ci/run` with recording fakes for pip and python; returns the process and their calls."""
    log = tmp_path / "calls.log"
    fake_bin = recording_commands(tmp_path / "fake-bin", ["pip", "python"], log)
    env = {**env, "PATH": f"{fake_bin}{os.pathsep}{env['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_ci_run_fails_before_installing_anything_without_pycil(tmp_path, no_pycil_env):
    proc, calls = ci_run(tmp_path, {**no_pycil_env, "CIM_PYCIL_BUNDLE": str(tmp_path / "missing.bundle")})
    assert proc.returncode != 0
    assert "no PyCIL for the PyCIL-backed tests" in proc.stderr
    assert calls == []


def test_ci_run_runs_the_readme_test_command_with_pycil_root(tmp_path, no_pycil_env):
    given = str(tmp_path / "PyCIL")
    proc, calls = ci_run(tmp_path, {**no_pycil_env, "PYCIL_ROOT": given})
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"pip install torch==2.14.1 torchvision==0.29.1 | PYCIL_ROOT={given}",
                     f"pip install -e .[test] | PYCIL_ROOT={given}",
                     f"python -m pytest -rs tests | PYCIL_ROOT={given}"]


def test_ci_run_calls_exactly_the_readme_test_command():
    assert f"'{readme_test_command()}'" in (REPO / ".ci" / "run").read_text()
