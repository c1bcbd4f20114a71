#!/usr/bin/env bash
# The collection's integration targets (tests/integration/targets) against
# the real libvirt of this node, as `ansible-test integration --local`
# runs them: root, destructive (they start throwaway VMs). Extra arguments
# go to ansible-test (a target's name, say).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
cd "$ROOT/ansible/ansible_collections/vdsm/blockops"
exec "$(dirname "$PY")/ansible-test" integration --local --python 3.11 --allow-destructive \
    --allow-root "$@"
