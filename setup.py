from setuptools import find_packages, setup

setup(
    name="vdsm-blockops",
    version="0.1.0",
    description="Live block operations (merge, relocate) on running libvirt/QEMU VMs",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="GPL-3.0-or-later",
    license_files=["LICENSE"],
    url="https://github.com/vdsm-blockops/vdsm-blockops",
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Systems Administration",
    ],
    python_requires=">=3.11",
    packages=find_packages(include=["vdsm_blockops", "vdsm_blockops.*"]),
    install_requires=[
        "libvirt-python>=9.0,<10",
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
                 "wheel"],  # wheel: the packaging test builds one without build isolation
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["vdsm-blockops=vdsm_blockops.shells.cli:run"]},
    package_data={"vdsm_blockops": ["py.typed"]},
)
