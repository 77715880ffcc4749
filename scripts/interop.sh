#!/usr/bin/env bash
# Creates (once) the Python venv of the interoperability tests from tests/interop/requirements.txt
# and prints its python. Idempotent: a complete venv made from the same requirements is reused;
# a changed requirements file gets a new one (the directory name carries a hash of the file).
#
#   PY=$(bash scripts/interop.sh)   # then: "$PY" tests/interop/consume_single_object.py ...
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

requirements="$REPO_ROOT/tests/interop/requirements.txt"
hash=$(sha256sum "$requirements" | cut -c1-12)
base="$TOOLS_DIR/interop-py-1"
venv="$base/$hash"
mkdir -p "$base"
# Tests run in parallel: one builds, the others wait for it.
exec 9>"$base/.lock"
flock 9
if [[ ! -f "$venv/.complete" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
