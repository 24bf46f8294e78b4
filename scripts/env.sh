# Sourced by scripts/main.sh and scripts/test.sh: make the virtualenv from setup.py when it is missing
# (or when setup.py changed since it was made), and point at the data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTL_GBML_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.setup-$(sha256sum "$ROOT/setup.py" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Setting up $VENV from setup.py (a few minutes the first time)..."
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  rm -f "$VENV"/.setup-* && touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
if [ -z "${MTL_GBML_DATA_DIR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
  export MTL_GBML_DATA_DIR="$(cd "$ROOT/../shared/data" && pwd)"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
