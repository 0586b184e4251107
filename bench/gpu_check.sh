#!/usr/bin/env bash
# The GPU check on a CUDA machine, in one command (see bench/gpu_check.py):
#   bench/gpu_check.sh OUT_DIR [more options of bench/gpu_check.py]
# Installs the wheels that bench/fetch_gpu_wheels.py put in .whl/ (what the GPU image lacks) into
# a folder of their own, without touching the image's packages, then runs the check with them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ $# -lt 1 ]; then
  echo "usage: bench/gpu_check.sh OUT_DIR [options of bench/gpu_check.py]" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing checked."
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in .whl/ (bench/fetch_gpu_wheels.py puts them there); using what is installed."
fi
exec "$PYTHON" -m bench.gpu_check "$@"
