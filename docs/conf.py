"""Sphinx configuration of the vdsm-blockops site (``python -m sphinx -W docs
docs/_build``; CI builds it with warnings as errors)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vdsm_blockops import __version__  # noqa: E402

project = "vdsm-blockops"
author = "vdsm-blockops developers"
copyright = "2026, vdsm-blockops developers"  # noqa: A001 (Sphinx's name)
version = release = __version__

extensions = ["sphinx.ext.autodoc", "cli_reference"]
exclude_patterns = ["_build", "examples"]
html_theme = "alabaster"
html_static_path: list = []

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
# libvirt is not needed to build the reference: the API imports it lazily.
