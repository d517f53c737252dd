"""Data files shipped with the package (read through :func:`read_text`, never by a path relative to the CWD).

* ``ace_sr_mapping.txt``: imSitu verb/role -> M2E2 event type/role, a byte copy of limanling/m2e2
  ``data/ace/ace_sr_mapping.txt`` (227 rows; see shared/notes/FORMATS.md §1 "Mapping files").
"""

from __future__ import annotations

from importlib import resources


def read_text(name: str) -> str:
    """The text of the packaged resource ``name`` (UTF-8); raises FileNotFoundError if it is not shipped."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
