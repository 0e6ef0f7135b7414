# Sourced by bin/up, bin/test and bin/connectd: create (once) and reuse the checkout's virtual
# environment in .venv, and (re)install the package when pyproject.toml changed since last time.
# Needs only Python 3.11+ on the PATH (or $PYTHON).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CONNECTD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "connectd needs Python 3.11 or newer as '$PY' (set PYTHON=/path/to/python3.11)." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.connectd-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.cfg" | cksum)${EXTRAS:-}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing connectd${EXTRAS:+[$EXTRAS]} and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT${EXTRAS:+[$EXTRAS]}" >&2
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
