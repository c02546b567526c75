#!/usr/bin/env bash
# The one prepared check for a lent accelerator machine (see benchmarks/device_check.py).
#
#   bash benchmarks/device_check.sh [device_check.py flags]    # e.g. --budget-s 330
#
# That machine has its own CUDA jax, flax, torch and no package registry: the
# project runs from this checkout (PYTHONPATH, nothing installed), and the few
# packages it lacks travel as wheels in .whl/ (segment-anything for the parity
# step, pycocotools + ml-collections for the trainer imports; .whl/optional/
# holds a flax wheel used only if the machine's flax cannot build the model).
# Make them here with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl segment-anything==1.0 pycocotools ml-collections`.
# Results: benchmarks/results/device_<device>.md, and $OUT/ when that is set.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${AOPSAM_SITE:-/tmp/aopsam_site}
# One wheel at a time: a wheel built for the GPU machine's Python (e.g. cp312) does not install
# elsewhere (a --smoke run here), which is fine when that package is importable already.
for whl in .whl/*.whl; do
  [ -e "$whl" ] || continue
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$whl" 2>/dev/null; then
    mod=$(basename "$whl" | cut -d- -f1)
    if "$PY" -c "import $mod" 2>/dev/null; then
      echo "device_check: $whl does not fit this Python; using the installed $mod" >&2
    else
      echo "device_check: installing $whl failed" >&2
      exit 1
    fi
  fi
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "from flax import nnx; nnx.List" 2>/dev/null; then
  echo "device_check: this flax lacks nnx.List; using the carried .whl/optional/flax wheel"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/optional/flax-*.whl || exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
exec "$PY" benchmarks/device_check.py "$@"
