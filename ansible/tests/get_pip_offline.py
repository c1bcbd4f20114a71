"""Stand-in for the get-pip.py bootstrap script that ``ansible-test`` downloads
from a host these machines cannot reach. Installed into ansible-test's cache
by ``ansible/tests/sanity.sh``. It does what get-pip.py does -- put pip into
the (empty) virtual environment it runs in, then ``pip install`` the
arguments -- but takes pip from CPython's bundled wheel (ensurepip) and the
rest from the package index pip is configured for."""

import subprocess
import sys

# get-pip's own switches; pip install does not know them.
OWN = {"--no-setuptools", "--no-wheel"}

# In a child process: ensurepip sets PIP_CONFIG_FILE=/dev/null in its own
# environment, which would hide the node's pip configuration (index, CA)
# from the install below.
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"])
args = [a for a in sys.argv[1:] if a not in OWN]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args]))
