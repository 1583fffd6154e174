#!/usr/bin/env bash
# Creates .venv at the repository root and installs fedemb into it with pip.
#   scripts/setup.sh           the full install: server, simulation (Ray), audit, synthesis  (.[all])
#   scripts/setup.sh --test    the full install and the test tools                          (.[all,test])
#   scripts/setup.sh --device  what a device runs: SuperNode, ClientApp, fedemb-device       (.)
# Idempotent: a second run finds everything installed and installs nothing new.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
case "${1:-}" in
  "")       target=all;    extras="[all]";      modules="fedemb flwr torch timm opacus ray sklearn" ;;
  --test)   target=test;   extras="[all,test]"; modules="fedemb flwr torch timm opacus ray sklearn pytest xdist hypothesis websockets" ;;
  --device) target=device; extras="";           modules="fedemb flwr torch timm" ;;
  *) echo "usage: scripts/setup.sh [--test | --device]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=".venv/.fedemb-installed-$target"
installed() {  # finds the target's packages without importing them (Ray and torch take seconds)
  .venv/bin/python -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))' $modules
}
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && installed 2>/dev/null; then
  echo "fedemb: environment up to date (.venv, $target)"
  exit 0
fi
"${pip[@]}" install -e ".$extras"
touch "$stamp"
echo "fedemb: installed into .venv, $target ($(.venv/bin/python -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)'))"
