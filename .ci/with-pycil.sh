#!/usr/bin/env bash
# Runs COMMAND with PYCIL_ROOT pointing at a PyCIL checkout, so that the PyCIL-backed tests run:
#   - PYCIL_ROOT as given, if it is set (the tests check it, and fail in CI if it is not PyCIL);
#   - else a clone of the PyCIL bundle at the commit the patches are made for (cim_plugin.PYCIL_COMMIT),
#     in a temporary folder outside the repository that is removed when COMMAND ends. The bundle is
#     $CIM_PYCIL_BUNDLE, by default ../shared/pycil/PyCIL.bundle beside this repository (see its README).
# The clone is left unpatched: the tests clone it again into their own folders and patch those.
# With neither, it fails (exit 2) before running anything. Exits with COMMAND's status.
# Usage: bash .ci/with-pycil.sh COMMAND [ARG...]
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: bash .ci/with-pycil.sh COMMAND [ARG...]" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)

if [ -n "${PYCIL_ROOT:-}" ]; then
  echo "with-pycil: PyCIL for the tests: PYCIL_ROOT=$PYCIL_ROOT (as given)" >&2
  exec "$@"
fi

bundle=${CIM_PYCIL_BUNDLE:-$(dirname "$repo")/shared/pycil/PyCIL.bundle}
if [ ! -f "$bundle" ]; then
  echo "with-pycil: error: no PyCIL for the PyCIL-backed tests: PYCIL_ROOT is not set and the PyCIL" \
       "bundle $bundle does not exist. Set PYCIL_ROOT to a git clone of PyCIL, or provide the bundle" \
       "(CIM_PYCIL_BUNDLE, default ../shared/pycil/PyCIL.bundle beside the repository)." >&2
  exit 2
fi
commit=$(sed -n 's/^PYCIL_COMMIT = "\([0-9a-f]\{40\}\)"$/\1/p' "$repo/cim_plugin/__init__.py")
[ -n "$commit" ] || { echo "with-pycil: error: no PYCIL_COMMIT in $repo/cim_plugin/__init__.py" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cim-plugin-pycil.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM HUP
git clone -q "$bundle" "$tmp/PyCIL"
git -C "$tmp/PyCIL" -c advice.detachedHead=false checkout -q "$commit"
export PYCIL_ROOT=$tmp/PyCIL
echo "with-pycil: PyCIL for the tests: PYCIL_ROOT=$PYCIL_ROOT (a clone of $bundle at ${commit:0:7}," \
     "removed afterwards)" >&2
"$@"
