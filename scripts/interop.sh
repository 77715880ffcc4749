#!/usr/bin/env bash
# The independent implementations the interoperability tests compare dualsync with, installed
# once under $TOOLS_DIR and reused (idempotent; a changed requirements file or pom gets a new
# directory, named by a hash of it):
#
#   bash scripts/interop.sh python   # prints the python of a venv with tests/interop/requirements.txt
#   bash scripts/interop.sh java     # prints a classpath with tests/interop/java/pom.xml's jars
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

what="${1:-python}"
case "$what" in
python) spec="$REPO_ROOT/tests/interop/requirements.txt"; base="$TOOLS_DIR/interop-py-1" ;;
java) spec="$REPO_ROOT/tests/interop/java/pom.xml"; base="$TOOLS_DIR/interop-java-1" ;;
*) echo "usage: $0 python|java" >&2; exit 2 ;;
esac
dir="$base/$(sha256sum "$spec" | cut -c1-12)"
mkdir -p "$base"
# Tests run in parallel: one installs, the others wait for it.
exec 9>"$base/.lock"
flock 9
if [[ ! -f "$dir/.complete" ]]; then
    rm -rf "$dir"
    if [[ "$what" == python ]]; then
        python3 -m venv "$dir" >&2
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$spec" >&2
    else
        # The Java tools run as single source files (java Consume.java): that needs a JDK.
        command -v javac >/dev/null 2>&1 ||
            die "no javac: the Java interop tools need a JDK (make up installs openjdk-17-jdk-headless)"
        mvn -B -q -f "$spec" dependency:copy-dependencies -DoutputDirectory="$dir/lib" >&2
    fi
    touch "$dir/.complete"
fi
if [[ "$what" == python ]]; then
    echo "$dir/bin/python"
else
    echo "$dir/lib/*"
fi
