"""``cim-plugin patch PYCIL_DIR``: bring a PyCIL checkout to the state cim-plugin needs.

What it does, all or nothing (every check runs before anything is written):

1. checks that PYCIL_DIR is a git checkout of PyCIL at ``cim_plugin.PYCIL_COMMIT``;
2. applies the plugin's ``patches/*.patch`` in order (``git apply``; one already in the tree is
   reported as "already applied", one that meets a local change stops everything);
3. links each of the plugin's ``exps/*.json`` into ``PYCIL_DIR/exps/`` (absolute symlinks, listed
   in ``.git/info/exclude`` so that ``git status`` stays clean; a user's file is never replaced);
4. records PYCIL_DIR (``locate.record_pycil_root``) so that the plugin, its tests and CI find it.

Running it again changes nothing and says so. Problems the user must fix raise ``PatchError``
with a message meant for them; the CLI prints it without a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cim_plugin import PYCIL_COMMIT, locate

#: Heads the block of link names that ``patch`` adds to ``.git/info/exclude``.
EXCLUDE_HEADER = "# cim-plugin: links to cim-plugin's exps/ (added by `cim-plugin patch`)"

_SHORT = PYCIL_COMMIT[:7]


class PatchError(Exception):
    """Something the user must fix first; nothing has been changed in the checkout."""


@dataclass
class PatchState:
    """One patch file and how it stands in a checkout."""

    name: str
    path: Path
    files: list[str]
    state: str  # "applied" (already in the tree), "pending" (applies cleanly) or "conflict"
    detail: str = ""  # for "conflict": why, as a sentence for the user


@dataclass
class LinkState:
    """One of the plugin's exps files and its link in ``PYCIL_DIR/exps``."""

    name: str
    link: Path
    target: Path
    state: str  # "present", "missing", "stale" (an old link of ours) or "conflict"
    detail: str = ""


@dataclass
class PatchReport:
    """What ``patch_pycil`` found and did."""

    root: Path
    commit: str
    applied: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    links_created: list[str] = field(default_factory=list)
    links_updated: list[str] = field(default_factory=list)
    links_present: list[str] = field(default_factory=list)
    exps_dir: Path | None = None  # where the links point to
    config: Path | None = None  # the config file, when the recorded root changed

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.links_created or self.links_updated)


# --------------------------------------------------------------------------------------- git


def _git(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # no GIT_DIR & co
    env["LC_ALL"] = "C"
    return subprocess.run(
        ["git", "-C", str(root), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
    )


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def check_checkout(pycil_dir) -> tuple[Path, str]:
    """``(root, head)`` if ``pycil_dir`` is a git checkout of PyCIL at ``PYCIL_COMMIT``.

    Raises PatchError with what is wrong and what to run otherwise.
    """
    given = str(pycil_dir)
    root = Path(pycil_dir).expanduser()
    if not root.exists():
        raise PatchError(f"{given} does not exist. Give the folder of your PyCIL git clone.")
    if not root.is_dir():
        raise PatchError(f"{given} is not a directory. Give the folder of your PyCIL git clone.")
    root = root.resolve()
    missing = locate.missing_markers(root)
    if missing:
        raise PatchError(
            f"{root} does not look like a PyCIL checkout (missing {', '.join(missing)}). "
            f"Give the top folder of a clone of https://github.com/G-U-N/PyCIL."
        )
    if shutil.which("git") is None:
        raise PatchError("git is not installed; cim-plugin needs it to check and patch PyCIL.")
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise PatchError(
            f"{root} is not a git checkout ({_first_line(head.stderr) or 'git rev-parse HEAD failed'}). "
            f"cim-plugin patches a git clone of PyCIL: "
            f"git clone https://github.com/G-U-N/PyCIL && git -C PyCIL checkout {PYCIL_COMMIT}"
        )
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode == 0 and Path(top.stdout.strip()).resolve() != root:
        raise PatchError(
            f"{root} is inside the git repository {top.stdout.strip()}, not the top of its own "
            f"PyCIL clone. Give the folder of a git clone of PyCIL."
        )
    commit = head.stdout.strip()
    if commit != PYCIL_COMMIT:
        subject = _git(root, "log", "-1", "--format=%s", commit).stdout.strip()
        have = _git(root, "cat-file", "-e", PYCIL_COMMIT + "^{commit}").returncode == 0
        how = f"git -C {root} checkout {PYCIL_COMMIT}"
        if not have:
            how = f"git -C {root} fetch origin {PYCIL_COMMIT} && " + how
        raise PatchError(
            f"PyCIL at {root} is at commit {commit[:7]}"
            + (f" ({subject})" if subject else "")
            + f", but cim-plugin's patches are for commit {_SHORT}. Check out that commit first "
            f"(or use a fresh clone): {how}"
        )
    return root, commit


# ----------------------------------------------------------------------------------- patches


def list_patches(patches_dir: Path | None = None) -> list[Path]:
    """The plugin's patch files, in the order they apply."""
    if patches_dir is None:
        try:
            patches_dir = locate.plugin_dir("patches")
        except FileNotFoundError as err:
            raise PatchError(str(err)) from None
    patches = sorted(p for p in Path(patches_dir).glob("*.patch") if p.is_file())
    if not patches:
        raise PatchError(f"no *.patch files in {patches_dir}: is your cim-plugin clone complete?")
    return patches


def patch_files(patch: Path) -> list[str]:
    """The paths (relative to the PyCIL root) that a patch touches, in order."""
    files = []
    for line in patch.read_text(encoding="utf-8").splitlines():
        m = re.match(r"diff --git a/(\S+) b/(\S+)$", line)
        if m and m.group(2) not in files:
            files.append(m.group(2))
    return files


def _local_changes(root: Path, files: list[str]) -> list[str]:
    """Those of ``files`` that differ from the commit (modified, deleted or untracked)."""
    out = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *files).stdout
    changed = []
    for line in out.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path in files and path not in changed:
            changed.append(path)
    return changed


def patch_states(root: Path, patches: list[Path]) -> list[PatchState]:
    """How each patch stands in the checkout at ``root`` (nothing is changed).

    The patches are made so that each one applies and reverses on its own, whatever the others'
    state, so each is checked against the tree as it is.
    """
    states = []
    for patch in patches:
        files = patch_files(patch)
        st = PatchState(patch.name, patch, files, "conflict")
        if _git(root, "apply", "--check", "--reverse", str(patch)).returncode == 0:
            st.state = "applied"
        else:
            fwd = _git(root, "apply", "--check", str(patch))
            if fwd.returncode == 0:
                st.state = "pending"
            else:
                why = _first_line(fwd.stderr)
                changed = _local_changes(root, files)
                if changed:
                    st.detail = (
                        f"{patch.name} does not apply: conflicting local change in "
                        f"{', '.join(changed)}; commit or stash it, or use a clean checkout"
                    )
                else:
                    st.detail = (
                        f"{patch.name} does not apply to {', '.join(files)}"
                        + (f" (git apply: {why})" if why else "")
                        + f"; use a clean checkout of commit {_SHORT}"
                    )
        states.append(st)
    return states


# ------------------------------------------------------------------------------- exps links


def _exclude_file(root: Path) -> Path:
    out = _git(root, "rev-parse", "--git-path", "info/exclude").stdout.strip()
    path = Path(out or ".git/info/exclude")
    return path if path.is_absolute() else root / path


def _excluded_names(root: Path) -> set[str]:
    try:
        lines = _exclude_file(root).read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {ln.strip() for ln in lines}


def link_states(root: Path, exps_dir: Path | None = None) -> list[LinkState]:
    """How each of the plugin's ``exps/*.json`` stands in ``root/exps`` (nothing is changed)."""
    if exps_dir is None:
        try:
            exps_dir = locate.plugin_dir("exps")
        except FileNotFoundError as err:
            raise PatchError(str(err)) from None
    ours = _excluded_names(root)
    states = []
    for src in sorted(Path(exps_dir).glob("*.json")):
        if not src.is_file():
            continue
        target = src.resolve()
        link = root / "exps" / src.name
        rel = f"exps/{src.name}"
        st = LinkState(src.name, link, target, "missing")
        if link.is_symlink():
            current = os.readlink(link)
            if Path(current) == target or link.resolve() == target:
                st.state = "present"
            elif "/" + rel in ours:
                st.state = "stale"  # a link cim-plugin made to an older place of the plugin
            else:
                st.state = "conflict"
                st.detail = (
                    f"{rel} in PyCIL is already a link to {current}, not to cim-plugin's {target}; "
                    f"rename or remove it (cim-plugin never replaces your files)"
                )
        elif link.exists():
            tracked = _git(root, "ls-files", "--error-unmatch", rel).returncode == 0
            st.state = "conflict"
            if tracked:
                st.detail = (
                    f"cim-plugin's exps/{src.name} has the name of PyCIL's own {rel}; "
                    f"rename the plugin's file"
                )
            else:
                st.detail = (
                    f"{link} already exists and is not cim-plugin's link; rename or remove it "
                    f"(cim-plugin never overwrites your files)"
                )
        states.append(st)
    return states


def _add_to_exclude(root: Path, names: list[str]) -> None:
    path = _exclude_file(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    have = {ln.strip() for ln in text.splitlines()}
    new = [f"/exps/{n}" for n in names if f"/exps/{n}" not in have]
    if not new:
        return
    if EXCLUDE_HEADER not in have:
        new.insert(0, EXCLUDE_HEADER)
    if text and not text.endswith("\n"):
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n".join(new) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------- patch


def patch_pycil(pycil_dir, *, patches_dir: Path | None = None, exps_dir: Path | None = None,
                record: bool = True) -> PatchReport:
    """Patch the PyCIL checkout at ``pycil_dir`` (see the module docstring); all or nothing."""
    root, commit = check_checkout(pycil_dir)
    patches = patch_states(root, list_patches(patches_dir))
    if exps_dir is None:
        try:
            exps_dir = locate.plugin_dir("exps")
        except FileNotFoundError as err:
            raise PatchError(str(err)) from None
    links = link_states(root, exps_dir)

    problems = [p.detail for p in patches if p.state == "conflict"]
    problems += [ln.detail for ln in links if ln.state == "conflict"]
    if problems:
        raise PatchError(
            f"cannot patch PyCIL at {root}; nothing was changed:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )

    report = PatchReport(root, commit, exps_dir=Path(exps_dir).resolve())
    report.already = [p.name for p in patches if p.state == "applied"]
    pending = [p for p in patches if p.state == "pending"]
    if pending:
        # One input for git apply, so that it applies all of them or none.
        text = "".join(p.path.read_text(encoding="utf-8") for p in pending)
        res = _git(root, "apply", "-", stdin=text)
        if res.returncode != 0:
            raise PatchError(
                f"git apply failed in {root}; nothing was changed: {_first_line(res.stderr)}"
            )
        report.applied = [p.name for p in pending]

    for ln in links:
        if ln.state == "present":
            report.links_present.append(ln.name)
            continue
        ln.link.parent.mkdir(parents=True, exist_ok=True)
        if ln.state == "stale":
            ln.link.unlink()
            report.links_updated.append(ln.name)
        else:
            report.links_created.append(ln.name)
        os.symlink(ln.target, ln.link)
    _add_to_exclude(root, [ln.name for ln in links])

    if record:
        before = locate.recorded_pycil_root()
        config = locate.record_pycil_root(root)
        if before != root:
            report.config = config
    return report


def format_report(report: PatchReport) -> str:
    """The summary ``cim-plugin patch`` prints."""
    n_links = len(report.links_created) + len(report.links_updated) + len(report.links_present)
    lines = []
    if not report.changed:
        lines.append(
            f"Everything is already applied in PyCIL at {report.root} (commit {report.commit[:7]}): "
            f"{len(report.already)} patches, {n_links} exps links."
        )
    else:
        lines.append(f"Patched PyCIL at {report.root} (commit {report.commit[:7]}):")
        for name in sorted(report.applied + report.already):  # in the order they apply
            state = "applied         " if name in report.applied else "already applied "
            lines.append(f"  {state} {name}")
        for name in report.links_created:
            lines.append(f"  linked           exps/{name}")
        for name in report.links_updated:
            lines.append(f"  relinked         exps/{name}")
        for name in report.links_present:
            lines.append(f"  already linked   exps/{name}")
        if n_links:
            lines.append(f"  (the links point into {report.exps_dir}/ and are listed in "
                         f".git/info/exclude)")
    if report.config is not None:
        lines.append(f"Recorded {report.root} in {locate.show_path(report.config)}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- where


def describe(root: Path, source: str) -> str:
    """What ``cim-plugin where`` prints for the PyCIL checkout at ``root`` (found via ``source``)."""
    lines = [f"PyCIL root: {root} ({source})"]
    head = _git(root, "rev-parse", "HEAD") if shutil.which("git") else None
    if head is None or head.returncode != 0:
        lines.append("commit:     unknown (not a git checkout)")
    elif head.stdout.strip() == PYCIL_COMMIT:
        lines.append(f"commit:     {_SHORT} (the commit cim-plugin's patches are for)")
    else:
        lines.append(f"commit:     {head.stdout.strip()[:7]} (cim-plugin's patches are for {_SHORT})")
    states = []
    if head is not None and head.returncode == 0:
        try:
            states = patch_states(root, list_patches())
        except PatchError:
            states = []
    if states:
        done = sum(s.state == "applied" for s in states)
        if done == len(states):
            lines.append(f"patched:    yes ({done}/{len(states)} patches applied)")
        else:
            todo = ", ".join(s.name for s in states if s.state != "applied")
            lines.append(
                f"patched:    no ({done}/{len(states)} patches applied; missing: {todo}); "
                f"run `cim-plugin patch {root}`"
            )
    else:
        patched = locate.is_patched(root)
        lines.append("patched:    " + ("yes" if patched else f"no; run `cim-plugin patch {root}`"))
    return "\n".join(lines)
