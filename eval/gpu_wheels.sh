#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machine lacks for the SD checks (diffusers at this venv's version, and
# importlib_metadata, which diffusers needs) into .whl/ (git-ignored through .git/info/exclude), for the device
# tool's `carry`. eval/gpu_check.sh installs whatever .whl/ holds before it starts.
#   bash eval/gpu_wheels.sh   then   device run: command "bash eval/gpu_check.sh sd", carry [".whl"]
set -euo pipefail
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version=$("$PY" -c 'import diffusers; print(diffusers.__version__)')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==$version" importlib_metadata
ls -l .whl
