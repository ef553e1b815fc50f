"""Griffe extension for the API reference: render Google-style ``Example:`` sections as code examples.

Griffe's Google parser turns ``Examples:`` (plural) into an examples section (``>>>`` lines become highlighted
code) but a singular ``Example:`` into a plain admonition, where ``>>>`` reads as a block quote. Our docstrings use
the singular form (STYLE.md), so this renames the heading before parsing. Loaded by ``mkdocs.yml`` only.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
