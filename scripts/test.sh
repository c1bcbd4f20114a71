#!/usr/bin/env bash
# The whole test suite, real libvirt included: sets the node up first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-node.sh
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
# Static checks: ansible-test sanity of the collection.
echo "== ansible-test sanity (vdsm.blockops collection)"
bash ansible/tests/sanity.sh

