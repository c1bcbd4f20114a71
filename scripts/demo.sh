#!/usr/bin/env bash
# Demonstration on a fresh Debian 12 machine (as root): sets the node up,
# then merges and relocates a throwaway VM's disk live.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-node.sh
exec .venv/bin/python scripts/demo.py
