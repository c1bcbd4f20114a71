from setuptools import find_packages, setup

setup(
    name="vdsm-blockops",
    version="0.1.0",
    description="Live block operations (merge, relocate) on running libvirt/QEMU VMs",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["vdsm_blockops", "vdsm_blockops.*"]),
    install_requires=[
        "libvirt-python>=9.0,<10",
        "lxml>=4.9",
        "PyYAML>=6.0",
        "tqdm>=4.64",
    ],
    extras_require={
        "test": ["pytest>=7", "mock>=5", "ansible-core>=2.15,<2.18"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["vdsm-blockops=vdsm_blockops.cli:main"]},
    package_data={"vdsm_blockops": ["py.typed"]},
)
