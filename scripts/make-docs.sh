#!/usr/bin/env bash
# Regenerate the files made from the parser, the verbs' text and the hook
# installer that the repository ships: the manual page and completions under
# share/ (installed by the wheel), README's verbs section (from
# vdsm_blockops/shells/verbs.rst) and hooks/vdsm-blockops-guard. tests/unit/test_packaging.py
# fails while any of them is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" - <<'PYEOF'
import os
from vdsm_blockops.engine.hookctl import shipped_hook
from vdsm_blockops.shells.manual import SHIPPED, readme_with_verbs
from vdsm_blockops.shells.parser import shipped_text

for path, kind in SHIPPED.items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(shipped_text(kind))
with open("hooks/vdsm-blockops-guard", "w", encoding="utf-8") as handle:
    handle.write(shipped_hook())
os.chmod("hooks/vdsm-blockops-guard", 0o755)
with open("README.rst", encoding="utf-8") as handle:
    readme = handle.read()
with open("README.rst", "w", encoding="utf-8") as handle:
    handle.write(readme_with_verbs(readme))
PYEOF
echo "made: $(ls share/man/man1/* share/*/*/* hooks/* | sort -u | tr '\n' ' ')"
