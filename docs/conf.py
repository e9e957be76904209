"""Sphinx configuration of the adamx docs site: the pages in docs/*.md and the API reference
built from the docstrings (``make docs``: ``sphinx-build -W``, warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's adamx

project = "adamx"
author = "the adamx authors"
copyright = "the adamx authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

# docstrings: Google-style sections (Args:, Returns:, Example:) with reST inside
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = "adamx"
