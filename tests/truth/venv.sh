#!/usr/bin/env bash
# Print the python of the ground-truth venv (tests/truth/requirements.txt), building it first
# when it does not exist yet. The venv is cached outside the checkout, keyed by a hash of the
# requirements, so CI and later runs on the same machine reuse it (about 2 minutes to build
# here from the package index; seconds when cached). MODELWATCH_TRUTH_VENV overrides the place.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
key="$(sha256sum "$here/requirements.txt" | cut -c1-12)"
venv="${MODELWATCH_TRUTH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/modelwatch/truth-venv-$key}"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -r "$here/requirements.txt" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
