#!/usr/bin/env bash
# The whole test suite, real libvirt included: sets the node up first, runs
# the static checks (mypy --strict, ruff, ansible-test sanity, ansible-lint), the
# API examples' types and the Sphinx site (warnings as errors), the
# collection's integration targets, then pytest
# (whose summary closes the output).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-node.sh
echo "== mypy --strict, ruff, vermin (Python 3.9 is the oldest supported)"
.venv/bin/mypy vdsm_blockops
.venv/bin/ruff check vdsm_blockops tests
.venv/bin/vermin -q -t=3.9- --violations --no-tips vdsm_blockops ansible/ansible_collections/vdsm/blockops/plugins
echo "== mypy --strict on the API's example programs; the site (sphinx -W)"
.venv/bin/mypy --strict docs/examples
docs_out=$(mktemp -d)  # outside the checkout: the sdist test walks docs/
.venv/bin/python -m sphinx -W -q -b html docs "$docs_out"
rm -rf "$docs_out"
# A check of the collection: its long output goes to a log, shown on failure.
collection_check() {  # NAME SCRIPT
    echo "== $1 (vdsm.blockops collection)"
    bash "$2" >"/tmp/vdsm-blockops-$(basename "$2" .sh).log" 2>&1 || {
        tail -50 "/tmp/vdsm-blockops-$(basename "$2" .sh).log"
        echo "$1 failed" >&2
        exit 1
    }
    echo "$1: passed"
}
collection_check "ansible-test sanity" ansible/tests/sanity.sh
collection_check "ansible-lint --profile production" ansible/tests/lint.sh
collection_check "ansible-test integration (real libvirt)" ansible/tests/integration.sh
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
