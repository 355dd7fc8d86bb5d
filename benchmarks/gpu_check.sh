#!/usr/bin/env bash
# Run benchmarks/gpu_check.py from this checkout with the machine's own Python, torch and JAX: nothing
# is installed and no network is used. Writes one folder of results (default gpu-check-<date>-<time>/)
# and stops after 10 minutes whatever happens.
#
#   benchmarks/gpu_check.sh [gpu_check.py options]       e.g. --out results/ --steps environment,timings
#
# PYTHON picks the interpreter (default python3). The checks need numpy, and for the conformance rows
# and the tests hypothesis, rich and pytest as well; where the machine lacks them, bring their wheels
# (pip download -d wheels hypothesis rich pytest --only-binary=:all: --python-version 3.12, on a
# machine with network) and set WHEELS=wheels: they are unpacked into a folder beside the results,
# offline, and put on PYTHONPATH. Exit status: gpu_check.py's (0 fine, 1 problems, 3 no GPU), or 124
# when the time ran out.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${WHEELS:-}" ]]; then
    deps="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-deps.XXXXXX")"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$deps" "$WHEELS"/*.whl \
        || echo "gpu_check.sh: could not unpack the wheels in $WHEELS; going on without them" >&2
    export PYTHONPATH="$PYTHONPATH:$deps"
fi
timeout --kill-after=10 600 "$PYTHON" benchmarks/gpu_check.py "$@"
