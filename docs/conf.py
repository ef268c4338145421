"""Sphinx configuration: Markdown pages (MyST) and an API reference from the docstrings (autodoc).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (warnings are errors, so a
broken link, a missing page or an unimportable module fails the build).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # autodoc documents the checkout being built

import ptth_sync  # noqa: E402

project = "ptth_sync"
author = "The ptth_sync developers"
copyright = "2026, The ptth_sync developers"
version = release = ptth_sync.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: GitHub-style anchors for headings, so "page.md#a-heading" links work here and on GitHub.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc: members in source order, signatures with their type hints.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Every reference must resolve: a class or function named in a docstring that the reference
# does not document is a warning (so an error). Standard-library and third-party names are
# not documented here and have no inventory offline; they are exempt.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(ssl|socket|threading|logging|datetime|collections|typing|types|contextlib)\..*"),
    (r"py:.*", r"(h2|hyperframe|hpack|gunicorn|pytest|_pytest)(\..*)?"),
    (r"py:class", r"(Any|Callable|Dict|Iterable|Iterator|List|Mapping|Optional|Sequence|Set|Tuple|Union)"),
    (r"py:class", r"(bool|bytes|float|int|str|object|dict|list|tuple|type|None|NoneType|memoryview|bytearray)"),
    (r"py:(class|exc)", r"(Exception|ValueError|TimeoutError|ConnectionError|OSError|RuntimeError|KeyError)"),
    # The engine's classes appear in signatures (Backend.connections, Router(settings=...),
    # request_handler) but are internal, so not in the reference.
    (r"py:class", r"(ptth_sync\.(connection|stream|engine(\.(connection|settings|stream))?)\.)?"
                  r"(Connection|ConnectionSettings|Stream)"),
    # Names the Router's docstrings give unqualified, for internals.
    (r"py:func", r"server_context"),
    (r"py:attr", r"shared_metrics"),
]

html_theme = "furo"
html_title = f"ptth_sync {release}"
html_static_path: list = []
