#!/usr/bin/env bash
# Benchmarks from a fresh checkout (as root): node setup, plot extra, run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-node.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q 'matplotlib>=3.7'
exec .venv/bin/python bench/run.py "$@"
