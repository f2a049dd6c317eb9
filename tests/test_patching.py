"""`cim-plugin patch` / `cim-plugin where` against a real PyCIL checkout.

Needs PyCIL: PYCIL_ROOT or the checkout recorded by `cim-plugin patch` (see cim_plugin.locate).
Every test works in its own `git clone` of that checkout (the committed pinned commit, clean even if
the user's checkout is patched) and its own XDG_CONFIG_HOME, so the user's files are never touched.
"""

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cim_plugin
from cim_plugin import PYCIL_COMMIT, cli, locate, patching
from pycil_checkout import pycil_unavailable, require_pycil_root

PYCIL_ROOT = require_pycil_root()

if subprocess.run(["git", "-C", str(PYCIL_ROOT), "cat-file", "-e", PYCIL_COMMIT + "^{commit}"],
                  capture_output=True).returncode != 0:
    pycil_unavailable(f"PyCIL at {PYCIL_ROOT} is not a git clone that holds commit {PYCIL_COMMIT[:7]}; "
                      f"these tests clone it")

pytestmark = pytest.mark.pycil

REPO = Path(cim_plugin.__file__).resolve().parent.parent
PATCHES = sorted(p.name for p in (REPO / "patches").glob("*.patch"))
EXPECTED_PATCHES = [
    "0001-cpu-device.patch",
    "0002-nme-forgetting-log.patch",
    "0003-getlen.patch",
    "0004-exemplar-workers.patch",
    "0005-resnet-stem.patch",
    "0006-plugin-hook.patch",
    "0007-json-errors.patch",
    "0008-distributed.patch",
]
CHANGED = {"trainer.py", "utils/data_manager.py", "models/base.py", "convs/resnet.py", "convs/ucir_resnet.py", "utils/factory.py",
           "main.py", "models/foster.py"}
ADDED = {"utils/plugin_hook.py", "utils/ddp_hook.py"}
FAKE_EXPS = ["cimtest_a.json", "cimtest_b.json"]


def git(repo, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {res.stderr}")
    return res.stdout


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own config folder (the user's recorded root is never rewritten), no PYCIL_ROOT."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PYCIL_ROOT", raising=False)


def make_clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(PYCIL_ROOT), str(dest)], check=True)
    if git(dest, "rev-parse", "HEAD").strip() != PYCIL_COMMIT:
        git(dest, "-c", "advice.detachedHead=false", "checkout", "-q", PYCIL_COMMIT)
    return dest


@pytest.fixture
def clone(tmp_path):
    return make_clone(tmp_path / "PyCIL")


@pytest.fixture
def fake_exps(tmp_path, monkeypatch):
    """The plugin's exps/ replaced by a temporary folder with two configs."""
    exps = tmp_path / "plugin_exps"
    exps.mkdir()
    for name in FAKE_EXPS:
        (exps / name).write_text('{"model_name": "icarl"}\n')
    real = locate.plugin_dir
    monkeypatch.setattr(locate, "plugin_dir", lambda name: exps if name == "exps" else real(name))
    return exps


def run_patch(capsys, root):
    code = cli.main(["patch", str(root)])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root):
    """Everything `patch` could change: tracked diff, untracked files, exps entries, config."""
    exps = sorted((p.name, p.is_symlink()) for p in (root / "exps").iterdir())
    cfg = locate.config_file()
    return (git(root, "diff"), git(root, "status", "--porcelain", "--ignored"), exps,
            cfg.read_text() if cfg.exists() else None)


def test_patch_files_are_the_expected_ones():
    assert PATCHES == EXPECTED_PATCHES


# --------------------------------------------------------------------------- apply, again


def test_fresh_apply_then_second_run_changes_nothing(clone, fake_exps, capsys):
    code, out, err = run_patch(capsys, clone)
    assert code == 0, err
    assert err == ""
    for name in EXPECTED_PATCHES:
        assert f"  applied          {name}" in out
    for name in FAKE_EXPS:
        assert f"  linked           exps/{name}" in out
    assert f"Recorded {clone} in {locate.config_file()}." in out
    assert locate.find_pycil_root() == (clone, "")
    assert locate.is_patched(clone)
    before = snapshot(clone)

    code, out, err = run_patch(capsys, clone)
    assert code == 0, err
    assert out.strip() == (
        f"Everything is already applied in PyCIL at {clone} (commit {PYCIL_COMMIT[:7]}): "
        f"{len(EXPECTED_PATCHES)} patches, {len(FAKE_EXPS)} exps links."
    )
    assert snapshot(clone) == before


def test_partly_patched_tree_is_completed(clone, fake_exps, capsys):
    git(clone, "apply", str(REPO / "patches" / "0003-getlen.patch"))
    git(clone, "apply", str(REPO / "patches" / "0006-plugin-hook.patch"))
    code, out, err = run_patch(capsys, clone)
    assert code == 0, err
    assert "  already applied  0003-getlen.patch" in out
    assert "  already applied  0006-plugin-hook.patch" in out
    assert "  applied          0001-cpu-device.patch" in out
    assert "  applied          0005-resnet-stem.patch" in out


def test_patched_tree_compiles_and_touches_only_expected_files(clone, fake_exps, capsys):
    assert run_patch(capsys, clone)[0] == 0
    stat = git(clone, "diff", "--stat")
    changed = {line.split("|")[0].strip() for line in stat.splitlines() if "|" in line}
    assert changed == CHANGED
    status = git(clone, "status", "--porcelain").splitlines()
    assert sorted(status) == sorted([f" M {f}" for f in CHANGED] + [f"?? {f}" for f in ADDED])
    res = subprocess.run([sys.executable, "-m", "py_compile", *sorted(CHANGED | ADDED)],
                         cwd=clone, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # small patches: this many lines changed in all
    numstat = [ln.split("\t") for ln in git(clone, "diff", "--numstat").splitlines()]
    assert sum(int(a) + int(d) for a, d, _ in numstat) <= 60


def test_trainer_calls_the_hook_in_the_right_places(clone, fake_exps, capsys):
    assert run_patch(capsys, clone)[0] == 0
    src = (clone / "trainer.py").read_text()
    train = next(n for n in ast.parse(src).body
                 if isinstance(n, ast.FunctionDef) and n.name == "_train")
    lines = [ast.unparse(s) for s in train.body]
    at = {key: next(i for i, ln in enumerate(lines) if key in ln) for key in (
        "print_args(args)", "args['logfilename'] = logfilename", "plugin_hook.before_run(args)",
        "DataManager(", "factory.get_model(", "plugin_hook.wrap_learner(model, args)")}
    assert (at["print_args(args)"] + 1 == at["args['logfilename'] = logfilename"]
            == at["plugin_hook.before_run(args)"] - 1 < at["DataManager("])
    assert at["factory.get_model("] + 1 == at["plugin_hook.wrap_learner(model, args)"]
    assert lines[-1] == "plugin_hook.after_run(model, args)"
    # under torchrun the plugin quiets the other ranks before PyCIL opens its log file
    assert lines[next(i for i, ln in enumerate(lines) if "logging.basicConfig(" in ln) - 1] == "ddp_hook.before_logging(args)"
    foster = (clone / "models" / "foster.py").read_text()
    assert "self._snet = ddp_hook.train_parallel(self, self._snet)" in foster  # the student's DDP seam
    assert "from utils import plugin_hook" in src
    dm = (clone / "utils" / "data_manager.py").read_text()
    get_idata = dm[dm.index("def _get_idata(dataset_name):"):]
    assert get_idata.split("\n")[1:4] == [
        "    idata = plugin_hook.get_idata(dataset_name)",
        "    if idata is not None:",
        "        return idata",
    ]


def test_patched_pycil_behaves(clone, fake_exps, capsys):
    """The fixes do what they say, in the patched PyCIL, with cim-plugin hidden."""
    assert run_patch(capsys, clone)[0] == 0
    script = textwrap.dedent("""
        import sys
        sys.modules["cim_plugin"] = None  # PyCIL without cim-plugin installed
        import numpy as np, torch
        import trainer
        from utils import plugin_hook
        from utils.data_manager import DataManager
        from convs.resnet import resnet18
        for dev in (["-1"], [-1], ["cpu"], [" -1 "]):
            args = {"device": dev}
            trainer._set_device(args)
            assert args["device"] == [torch.device("cpu")], (dev, args)
        args = {"device": ["0", "1"]}
        trainer._set_device(args)
        assert args["device"] == [torch.device("cuda:0"), torch.device("cuda:1")]
        dm = DataManager.__new__(DataManager)
        dm._train_targets = np.array([0, 3, 3, 5, 3])
        assert dm.getlen(3) == 3 and dm.getlen(0) == 1 and dm.getlen(9) == 0
        net = resnet18(args={"dataset": "synthetic", "model_name": "icarl",
                             "init_cls": 5, "increment": 5})
        assert net(torch.zeros(1, 3, 64, 64))["features"].shape == (1, 512)
        assert plugin_hook._plugin is None and plugin_hook.get_idata("x") is None
        assert plugin_hook.get_model("lucir", {}) is None
        from utils import factory
        try:
            factory.get_model("lucir", {})
            raise AssertionError("an unknown model_name was accepted")
        except NotImplementedError as err:
            assert str(err) == "Unknown model_name lucir", err
        plugin_hook.before_run({"cim": False})
        model = object()
        assert plugin_hook.wrap_learner(model, {}) is model
        plugin_hook.after_run(model, {})
        import main  # the JSON's errors name the file, line and column; no cim-plugin: no key checks
        with open("bad.json", "w") as f:
            f.write('{\\n  "seed": [1993]\\n  "device": ["-1"]\\n}\\n')
        try:
            main.load_json("bad.json")
            raise AssertionError("malformed JSON was accepted")
        except SystemExit as err:
            assert str(err) == "bad.json:3:3: not valid JSON: Expecting ',' delimiter", err
        with open("odd.json", "w") as f:
            f.write('{"seed": 1993}')
        assert main.load_json("odd.json") == {"seed": 1993}
        plugin_hook.before_run({"cim": True})
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=clone, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=""), timeout=120)
    assert res.returncode == 1, res.stderr  # SystemExit with a message from the last line
    assert res.stderr.strip().splitlines()[-1] == (
        '"cim": true needs cim-plugin: pip install -e <path to your cim-plugin clone>')
    log = (clone / "models" / "base.py").read_text()
    assert log.count('num_workers=self.args.get("num_workers", 4)') == 6
    assert "num_workers=4" not in log
    assert "logging.info('Forgetting (NME): {}'.format(forgetting))" in (
        clone / "trainer.py").read_text()


# ------------------------------------------------------------------------------- refusals


def test_wrong_commit_is_refused(clone, fake_exps, capsys):
    (clone / "README.md").write_text("local edit\n")
    git(clone, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "mine")
    head = git(clone, "rev-parse", "--short=7", "HEAD").strip()
    before = snapshot(clone)
    code, out, err = run_patch(capsys, clone)
    assert code == 2 and out == ""
    assert err == (
        f"cim-plugin patch: error: PyCIL at {clone} is at commit {head} (mine), but cim-plugin's "
        f"patches are for commit {PYCIL_COMMIT[:7]}. Check out that commit first (or use a fresh "
        f"clone): git -C {clone} checkout {PYCIL_COMMIT}\n"
    )
    assert "Traceback" not in err
    assert snapshot(clone) == before


@pytest.mark.parametrize(
    "path, old, new, patch",
    [
        ("trainer.py", "        if device_type == -1:\n", "        if device_type in (-1, '-1'):\n",
         "0001-cpu-device.patch"),
        # a later patch conflicts: the earlier ones, which would apply, must not be applied either
        ("utils/data_manager.py", "    name = dataset_name.lower()\n",
         "    name = dataset_name.lower().strip()\n", "0006-plugin-hook.patch"),
    ],
    ids=["set_device", "get_idata"],
)
def test_conflicting_local_change_is_refused_and_nothing_applied(
        clone, fake_exps, capsys, path, old, new, patch):
    text = (clone / path).read_text()
    assert text.count(old) == 1
    (clone / path).write_text(text.replace(old, new))
    before = snapshot(clone)
    code, out, err = run_patch(capsys, clone)
    assert code == 2 and out == ""
    assert err.startswith(f"cim-plugin patch: error: cannot patch PyCIL at {clone}; "
                          f"nothing was changed:\n")
    assert (f"  - {patch} does not apply: conflicting local change in {path}; commit or stash it, "
            f"or use a clean checkout\n") in err
    assert err.count("  - ") == 1  # only the conflicting patch is named
    assert snapshot(clone) == before
    assert not (clone / "utils" / "plugin_hook.py").exists()
    assert not locate.config_file().exists()


# --------------------------------------------------------------------------------- exps links


def test_exps_links_are_absolute_and_ignored_by_git(clone, fake_exps, capsys):
    assert run_patch(capsys, clone)[0] == 0
    for name in FAKE_EXPS:
        link = clone / "exps" / name
        assert link.is_symlink()
        target = os.readlink(link)
        assert os.path.isabs(target) and Path(target) == (fake_exps / name).resolve()
        assert link.read_text() == (fake_exps / name).read_text()
    assert git(clone, "status", "--porcelain", "--", "exps") == ""
    exclude = (clone / ".git" / "info" / "exclude").read_text().splitlines()
    assert exclude[-3:] == [patching.EXCLUDE_HEADER] + [f"/exps/{n}" for n in FAKE_EXPS]


def test_moved_plugin_links_are_renewed(clone, fake_exps, tmp_path, monkeypatch, capsys):
    assert run_patch(capsys, clone)[0] == 0
    moved = tmp_path / "moved_exps"
    shutil.move(str(fake_exps), str(moved))  # the user moved their cim-plugin clone
    real = locate.plugin_dir
    monkeypatch.setattr(locate, "plugin_dir", lambda name: moved if name == "exps" else real(name))
    code, out, err = run_patch(capsys, clone)
    assert code == 0, err
    for name in FAKE_EXPS:
        assert f"  relinked         exps/{name}" in out
        assert Path(os.readlink(clone / "exps" / name)) == (moved / name).resolve()
    exclude = (clone / ".git" / "info" / "exclude").read_text().splitlines()
    assert exclude.count(patching.EXCLUDE_HEADER) == 1 and exclude.count("/exps/cimtest_a.json") == 1


@pytest.mark.parametrize("kind", ["file", "foreign-link"])
def test_user_file_with_a_plugin_exps_name_is_never_replaced(clone, fake_exps, tmp_path, capsys,
                                                             kind):
    mine = clone / "exps" / FAKE_EXPS[0]
    if kind == "file":
        mine.write_text('{"mine": true}\n')
    else:
        (tmp_path / "elsewhere.json").write_text("{}\n")
        mine.symlink_to(tmp_path / "elsewhere.json")
    before = snapshot(clone)
    code, out, err = run_patch(capsys, clone)
    assert code == 2 and out == ""
    assert "nothing was changed" in err
    if kind == "file":
        assert (f"  - {mine} already exists and is not cim-plugin's link; rename or remove it "
                f"(cim-plugin never overwrites your files)") in err
        assert mine.read_text() == '{"mine": true}\n' and not mine.is_symlink()
    else:
        assert f"exps/{FAKE_EXPS[0]} in PyCIL is already a link to {tmp_path / 'elsewhere.json'}" in err
        assert os.readlink(mine) == str(tmp_path / "elsewhere.json")
    assert snapshot(clone) == before  # no patch applied, no other link made


def test_plugin_exps_named_like_pycils_own_is_refused(clone, fake_exps, capsys):
    (fake_exps / "icarl.json").write_text("{}\n")  # PyCIL ships exps/icarl.json
    code, out, err = run_patch(capsys, clone)
    assert code == 2
    assert "cim-plugin's exps/icarl.json has the name of PyCIL's own exps/icarl.json" in err
    assert git(clone, "status", "--porcelain") == ""


def test_real_plugin_exps_do_not_clash_with_pycil():
    ours = {p.name for p in locate.plugin_dir("exps").glob("*.json")}
    theirs = {Path(p).name for p in git(PYCIL_ROOT, "ls-tree", "--name-only", PYCIL_COMMIT,
                                        "exps/").split()}
    assert theirs, "PyCIL's exps/ should not be empty"
    assert not ours & theirs


# --------------------------------------------------------------------------------- where, CLI


def test_where_reports_root_source_and_state(clone, fake_exps, tmp_path, monkeypatch, capsys):
    assert run_patch(capsys, clone)[0] == 0
    assert cli.main(["where"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"PyCIL root: {clone} (recorded in {locate.config_file()})",
        f"commit:     {PYCIL_COMMIT[:7]} (the commit cim-plugin's patches are for)",
        f"patched:    yes ({len(EXPECTED_PATCHES)}/{len(EXPECTED_PATCHES)} patches applied)",
    ]

    other = make_clone(tmp_path / "other")
    git(other, "apply", str(REPO / "patches" / "0002-nme-forgetting-log.patch"))
    monkeypatch.setenv("PYCIL_ROOT", str(other))
    assert cli.main(["where"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"PyCIL root: {other} (from PYCIL_ROOT)"
    assert out[2] == (
        f"patched:    no (1/{len(EXPECTED_PATCHES)} patches applied; missing: "
        + ", ".join(n for n in EXPECTED_PATCHES if n != "0002-nme-forgetting-log.patch")
        + f"); run `cim-plugin patch {other}`"
    )


def test_console_entry_point_end_to_end(clone):
    """`python -m cim_plugin.cli` with the real patches/ and exps/ (no monkeypatching)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cim_plugin.cli", *args], capture_output=True,
                              text=True, env=env, cwd=clone.parent)

    first = run("patch", str(clone))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"Patched PyCIL at {clone}")
    second = run("patch", str(clone))
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("Everything is already applied")
    for src in locate.plugin_dir("exps").glob("*.json"):
        assert (clone / "exps" / src.name).resolve() == src.resolve()
    assert git(clone, "status", "--porcelain", "--", "exps") == ""
    where = run("where")
    assert where.returncode == 0 and f"PyCIL root: {clone}" in where.stdout
