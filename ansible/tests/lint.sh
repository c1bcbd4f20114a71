#!/usr/bin/env bash
# ansible-lint, production profile, on the vdsm.blockops collection (its
# settings: the collection's .ansible-lint). ansible-lint pins its own
# ansible-core and friends: it gets a virtualenv of its own (.venv-lint),
# made once, so the project's .venv keeps the ansible-core it is tested with.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LINT_VENV=$ROOT/.venv-lint
if [ ! -x "$LINT_VENV/bin/ansible-lint" ]; then
    python3 -m venv "$LINT_VENV"
    "$LINT_VENV/bin/pip" install -q 'ansible-lint==26.10.1'
fi
cd "$ROOT/ansible/ansible_collections/vdsm/blockops"
ANSIBLE_COLLECTIONS_PATH="$ROOT/ansible" exec "$LINT_VENV/bin/ansible-lint" --nocolor "$@"
