#!/usr/bin/env bash
# The whole test suite, real libvirt included: sets the node up first, runs
# the static checks (mypy --strict, ruff, ansible-test sanity, ansible-lint), then pytest
# (whose summary closes the output).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-node.sh
echo "== mypy --strict, ruff, vermin (Python 3.9 is the oldest supported)"
.venv/bin/mypy vdsm_blockops
.venv/bin/ruff check vdsm_blockops tests
.venv/bin/vermin -q -t=3.9- --violations --no-tips vdsm_blockops ansible/ansible_collections/vdsm/blockops/plugins
echo "== ansible-test sanity (vdsm.blockops collection)"
bash ansible/tests/sanity.sh >/tmp/vdsm-blockops-sanity.log 2>&1 || {
    tail -50 /tmp/vdsm-blockops-sanity.log
    echo "ansible-test sanity failed" >&2
    exit 1
}
echo "ansible-test sanity: passed"
echo "== ansible-lint --profile production (vdsm.blockops collection)"
bash ansible/tests/lint.sh >/tmp/vdsm-blockops-lint.log 2>&1 || {
    tail -50 /tmp/vdsm-blockops-lint.log
    echo "ansible-lint failed" >&2
    exit 1
}
echo "ansible-lint: passed"
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
