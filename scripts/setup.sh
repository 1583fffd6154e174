#!/usr/bin/env bash
# Creates .venv at the repository root and installs fedemb into it with pip.
# Idempotent: a second run finds everything installed and installs nothing new.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp=".venv/.fedemb-installed${extras:+-test}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && .venv/bin/python -c "import fedemb, flwr, torch, timm, opacus" 2>/dev/null; then
  echo "fedemb: environment up to date (.venv)"
  exit 0
fi
"${pip[@]}" install -e ".$extras"
touch "$stamp"
echo "fedemb: installed into .venv ($(.venv/bin/python -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)'))"
