"""Where PyCIL and the plugin's own folders are.

PyCIL is not a Python package: it is a git checkout that ``cim-plugin patch PYCIL_DIR`` patches.
The plugin (and its tests, and CI) find that checkout, in this order:

1. the environment variable ``PYCIL_ROOT`` (if it is set, it must be valid: it is never silently
   skipped in favour of the recorded checkout);
2. the checkout recorded by ``cim-plugin patch`` in ``$XDG_CONFIG_HOME/cim-plugin/config.json``
   (``~/.config/cim-plugin/config.json`` by default).

This module imports nothing heavy (no torch) so that ``cim-plugin where`` and the tests stay fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_open

ENV_VAR = "PYCIL_ROOT"

#: Files whose presence makes a directory "look like PyCIL".
PYCIL_MARKERS = ("main.py", "trainer.py", "models/base.py")

#: The plugin's top-level folders that ``plugin_dir`` hands out.
PLUGIN_DIRS = ("patches", "exps")

_HINT = "set PYCIL_ROOT to a PyCIL checkout or run `cim-plugin patch /path/to/PyCIL`"


def config_file() -> Path:
    """``$XDG_CONFIG_HOME/cim-plugin/config.json`` (``~/.config/cim-plugin/config.json`` if unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    # The XDG spec says a relative (or empty) XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "cim-plugin" / "config.json"


def _read_config() -> dict:
    """The config file's content; {} if it does not exist. Raises ValueError if it is unusable."""
    path = config_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def record_pycil_root(path) -> Path:
    """Record ``path`` (made absolute) as the PyCIL checkout; returns the config file written.

    The file is replaced atomically (temporary file + rename), so a reader never sees half of it.
    Other keys already in the file are kept.
    """
    root = Path(path).expanduser().resolve()
    target = config_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = _read_config()
    except ValueError:
        data = {}  # an unreadable file is replaced by a good one
    data["pycil_root"] = str(root)
    with atomic_open(target, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    return target


def recorded_pycil_root() -> Path | None:
    """The checkout recorded by ``cim-plugin patch`` (not checked), or None."""
    try:
        value = _read_config().get("pycil_root")
    except ValueError:
        return None
    return Path(str(value)) if value else None


def show_path(path) -> str:
    """``path`` for messages: ``~/...`` when it is under the home directory."""
    p = Path(path)
    try:
        return "~/" + p.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(p)


def missing_markers(path) -> list[str]:
    """The PyCIL files that ``path`` lacks (all of them if it is not a directory)."""
    p = Path(path)
    return [m for m in PYCIL_MARKERS if not (p / m).is_file()]


def _check(path: Path) -> str:
    """"" if ``path`` is a PyCIL checkout, else what is wrong with it (a sentence fragment)."""
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is not a directory"
    missing = missing_markers(path)
    if missing:
        return "it does not look like a PyCIL checkout (missing {})".format(", ".join(missing))
    return ""


def find_pycil_root() -> tuple[Path | None, str]:
    """``(path, "")`` for the PyCIL checkout to use, or ``(None, reason)`` saying why there is none.

    The reason is a plain sentence that tells the user what to do.
    """
    env = os.environ.get(ENV_VAR, "")
    if env.strip():
        path = Path(env).expanduser()
        problem = _check(path)
        if problem:
            return None, (
                f"PyCIL not found: {ENV_VAR} is set to {env}, but {problem}. "
                f"Point {ENV_VAR} at a PyCIL checkout, or unset it to use the checkout "
                f"recorded by `cim-plugin patch`."
            )
        return path.resolve(), ""

    cfg = config_file()
    try:
        recorded = _read_config().get("pycil_root")
    except ValueError as err:
        return None, f"PyCIL not found: {_HINT} (no {ENV_VAR} set; {err})."
    shown = show_path(cfg)
    if not recorded:
        return None, (
            f"PyCIL not found: {_HINT} (no {ENV_VAR} set, no recorded checkout in {shown})."
        )
    path = Path(str(recorded)).expanduser()
    problem = _check(path)
    if problem:
        return None, (
            f"PyCIL not found: the checkout recorded in {shown} is {recorded}, but {problem}. "
            f"Run `cim-plugin patch /path/to/PyCIL` again, or set {ENV_VAR}."
        )
    return path.resolve(), ""


def is_patched(root) -> bool:
    """True if cim-plugin's hook is in the PyCIL checkout at ``root``.

    That is: ``utils/plugin_hook.py`` exists and ``trainer.py`` calls it. (``cim-plugin where``
    reports each patch separately.)
    """
    root = Path(root)
    try:
        trainer = (root / "trainer.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return (root / "utils" / "plugin_hook.py").is_file() and "plugin_hook.before_run(" in trainer


def plugin_repo() -> Path:
    """The cim-plugin git clone the package was (editable-)installed from."""
    import cim_plugin

    return Path(cim_plugin.__file__).resolve().parent.parent


def plugin_dir(name: str) -> Path:
    """The plugin's top-level ``patches/`` or ``exps/`` folder.

    They live in the git clone, next to the ``cim_plugin`` package, so they are only there when
    cim-plugin is installed editable (``pip install -e <clone>``) or run from its clone.
    """
    if name not in PLUGIN_DIRS:
        raise ValueError(f"unknown plugin folder {name!r}; expected one of {', '.join(PLUGIN_DIRS)}")
    repo = plugin_repo()
    path = repo / name
    is_clone = (repo / "setup.cfg").is_file() or (repo / "pyproject.toml").is_file()
    if not (is_clone and path.is_dir()):
        raise FileNotFoundError(
            f"cim-plugin's {name}/ folder is not next to the cim_plugin package (looked for {path}). "
            f"It ships only with the git clone: install cim-plugin with "
            f"`pip install -e <path to your cim-plugin clone>` (not a plain `pip install`)."
        )
    return path
