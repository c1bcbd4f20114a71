import re

from setuptools import find_packages, setup

# One version: the package's (galaxy.yml and the changelogs follow it; a
# unit test compares them).
VERSION = re.search(r'^__version__ = "([^"]+)"', open("vdsm_blockops/__init__.py").read(),
                    re.M).group(1)

setup(
    name="vdsm-blockops",
    version=VERSION,
    description="Live block operations (merge, relocate) on running libvirt/QEMU VMs",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="GPL-3.0-or-later",
    license_files=["LICENSE"],
    url="https://github.com/vdsm-blockops/vdsm-blockops",
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Systems Administration",
    ],
    # 3.9: oVirt 4.5 nodes, EL9, Debian 11 (CI runs the unit tests there too)
    python_requires=">=3.9",
    packages=find_packages(include=["vdsm_blockops", "vdsm_blockops.*"]),
    install_requires=[
        # any binding from 9.0 on: newer ones build against an older libvirt
        # (measured: 12.8.0 against Debian 12's libvirt 9.0, on Python 3.9);
        # a distro's python3-libvirt serves through --system-site-packages
        "libvirt-python>=9.0",
        "lxml>=4.9",
        "PyYAML>=6.0",
        "tqdm>=4.64",
        # `completion` and `manpage` verbs; both small, pure Python.
        "shtab>=1.6",
        "argparse-manpage>=4",
    ],
    extras_require={
        # ansible-core: 2.17 is the oldest the modules are tested with, 2.19
        # the current release (its ansible-test runs the collection's sanity
        # tests in CI); below 2.20 until a release is tried.
        "test": ["pytest>=7", "mock>=5", "ansible-core>=2.17,<2.20", "mypy>=1.10", "ruff>=0.5",
                 "lxml-stubs", "types-PyYAML",
                 "vermin",  # the static check of the oldest Python supported
                 "sphinx>=7,<9",  # the site under docs/, built with -W in CI
                 "wheel"],  # wheel: the packaging test builds one without build isolation
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["vdsm-blockops=vdsm_blockops.shells.cli:run"]},
    package_data={"vdsm_blockops": ["py.typed", "shells/verbs.rst"]},
    # Where man and bash-completion look beside a bin folder on PATH (a
    # venv's too); made from the parser by scripts/make-docs.sh.
    data_files=[
        ("share/man/man1", ["share/man/man1/vdsm-blockops.1"]),
        ("share/bash-completion/completions", ["share/bash-completion/completions/vdsm-blockops"]),
        ("share/zsh/site-functions", ["share/zsh/site-functions/_vdsm-blockops"]),
    ],
)
