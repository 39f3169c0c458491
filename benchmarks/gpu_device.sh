#!/usr/bin/env bash
# The GPU table on a CUDA machine without internet whose python3 holds CUDA torch (issue 23):
#   here:  make gpu-wheels                      (fills .whl/ with the toolkit's pinned libraries)
#   there: bash benchmarks/gpu_device.sh        (with .whl/ carried beside the repository)
# Installs the wheels into a scratch folder (never into the image), checks the versions the toolkit is tested with
# are the ones imported, then runs benchmarks/gpu_bench.py (<= 7.5 min) and benchmarks/train_smoke.py (<= 75 s).
# Results go to $OUT if set (the lending tool's return folder), else benchmarks/results. Whole: about 9.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/dualpriv-site}
WHEELS=${WHEELS:-.whl}
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: run 'make gpu-wheels' where PyPI is reachable and carry .whl with the repository" >&2
  exit 2
fi
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/gpu_wheels.py --check-imported
RESULTS=${OUT:-benchmarks/results}
rc=0
"$PYTHON" benchmarks/gpu_bench.py --out "$RESULTS" "$@" || rc=$?
# then every method and privacy mode trains a few steps on the device (<= 75 s): what the table does not run
"$PYTHON" benchmarks/train_smoke.py --device "${TRAIN_DEVICE:-cuda}" --out "$RESULTS" --time-limit 75 || rc=$?
exit $rc
