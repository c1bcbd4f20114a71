#!/usr/bin/env bash
# ansible-test sanity for the vdsm.blockops collection, on these machines:
# ansible-test bootstraps pip in its test venvs with a script it downloads
# from a host that cannot be reached here, so an offline stand-in goes into
# its cache first (ansible/tests/get_pip_offline.py); everything else comes
# from the package index. Extra arguments go to ansible-test.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
AT_DIR=$("$PY" -c "import ansible_test, os; print(os.path.dirname(ansible_test.__file__))")
PIP_VERSION=$(sed -n "s/^ *pip='\([0-9.]*\)',*$/\1/p" "$AT_DIR/_internal/python_requirements.py" | head -1)
CACHE="$HOME/.ansible/test/cache/get_pip_${PIP_VERSION//./_}.py"
mkdir -p "$(dirname "$CACHE")"
cmp -s "$ROOT/ansible/tests/get_pip_offline.py" "$CACHE" 2>/dev/null ||
    cp "$ROOT/ansible/tests/get_pip_offline.py" "$CACHE"
cd "$ROOT/ansible/ansible_collections/vdsm/blockops"
exec "$(dirname "$PY")/ansible-test" sanity --local --python 3.11 "$@"
