"""The PyCIL checkout the PyCIL-backed tests use, and what happens when there is none.

Those tests find PyCIL the documented way (cim_plugin.locate: PYCIL_ROOT, else the checkout recorded
by `cim-plugin patch`). Without one, outside CI they are skipped with the reason (`-rs` prints it);
in CI (the CI runner sets ``CI=true``) they fail instead, so that CI cannot pass having run none of
them. `.ci/run` gives them PYCIL_ROOT (see .ci/with-pycil.sh).
"""

import os
from pathlib import Path

import pytest

from cim_plugin import locate


def in_ci() -> bool:
    """True when the CI runner's ``CI`` variable is set to true (also 1 or yes)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pycil_unavailable(reason: str):
    """Skip the calling test module because PyCIL is not usable (``reason`` says why); in CI, fail it."""
    __tracebackhide__ = True  # reports name the test module's line, not this one
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the PyCIL-backed tests must run, not be skipped; "
                    f".ci/run sets PYCIL_ROOT)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_pycil_root() -> Path:
    """The PyCIL checkout to use; called at module level, it skips (or, in CI, fails) the module."""
    __tracebackhide__ = True
    root, reason = locate.find_pycil_root()
    if root is None:
        pycil_unavailable(reason)
    return root
