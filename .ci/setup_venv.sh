#!/usr/bin/env bash
# Create or update the project-local virtual environment .venv (idempotent; a no-op when up to date).
# torch and the other heavy dependencies are pinned by constraints.txt so that the CPU torch wheel is used and
# no later install upgrades it. Set PYTHON to choose the interpreter (default: python3, >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing into .venv (pinned by constraints.txt) ..." >&2
  start=$(date +%s)
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, trl, deepspeed, ray, hydra, wandb, datasets, math_verify" \
    || { echo "install failed: see the pip output above" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "installed in $(( $(date +%s) - start )) s" >&2
fi
