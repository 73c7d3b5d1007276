#!/usr/bin/env bash
# One-call embed check for a GPU node (see benchmarks/gpu_check.py for what it measures).
#
#   benchmarks/gpu_check.sh OUT                        # GPU node: ~5-8 min on one H100
#   benchmarks/gpu_check.sh OUT --quick --device cpu   # seconds: checks the script (the suite)
#
# Writes OUT/gpu_check.json and OUT/gpu_check.md and prints the table. Exit status 1 when a
# mode failed or decoded tiles disagree with OpenSlide; the whole run is killed after
# GPU_CHECK_TIMEOUT seconds (default 570: inside a 10-minute job limit; the files are
# rewritten after every mode, so a killed run still leaves its table so far).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT_DIR [--quick] [--device auto|cpu|cuda] [--encoders A,B] ..." >&2
    exit 2
fi
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-570}" "$py" "$here/gpu_check.py" "$@"
