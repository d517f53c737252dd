"""Backbone families, one folder each (``rmpl_ds/backbones/<family>/``: ``spec.py`` holds the facts, ``adapter.py``
the code), looked up by explicit name (no substring detection on model paths).

>>> from rmpl_ds.backbones import FAMILIES, get_spec
>>> "qwen2-vl" in FAMILIES
True
>>> get_spec("qwen2-vl").model_type
'qwen2_vl'

Importing this package, or a family's spec, is cheap (no torch, no transformers): the recipe layer validates
against the specs before anything heavy loads. A family's adapter is built on the first :func:`get_adapter` call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rmpl_ds.errors import UserError

if TYPE_CHECKING:
    from rmpl_ds.backbones.adapter import BackboneAdapter
    from rmpl_ds.backbones.spec import FamilySpec

# family name (recipes' model.family, the CLI's --backbone) -> its package
FAMILIES: dict[str, str] = {
    "qwen2-vl": "rmpl_ds.backbones.qwen2_vl",
    "qwen3-vl": "rmpl_ds.backbones.qwen3_vl",
    "internvl3_5": "rmpl_ds.backbones.internvl",
    "qwen2.5-vl": "rmpl_ds.backbones.qwen2_5_vl",
}

_ADAPTERS: dict[str, BackboneAdapter] = {}


def get_spec(family: str) -> FamilySpec:
    """The facts of ``family`` (one of :data:`FAMILIES`); cheap to call.

    Raises:
        UserError: an unknown family; the message lists the known ones.
    """
    return importlib.import_module(f"{_package(family)}.spec").SPEC


def get_adapter(family: str) -> BackboneAdapter:
    """The adapter of ``family`` (one per process).

    Raises:
        UserError: an unknown family; the message lists the known ones.
    """
    if family not in _ADAPTERS:
        module = importlib.import_module(f"{_package(family)}.adapter")
        _ADAPTERS[family] = module.Adapter(get_spec(family))
    return _ADAPTERS[family]


def specs() -> list[FamilySpec]:
    """Every family's spec, in registry order."""
    return [get_spec(family) for family in FAMILIES]


def _package(family: str) -> str:
    if family not in FAMILIES:
        raise UserError(f"unknown backbone {family!r}; known backbones: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


__all__ = ["FAMILIES", "get_adapter", "get_spec", "specs"]
