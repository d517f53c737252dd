"""Backbone families, looked up by explicit name (no substring detection on model paths).

>>> from rmpl_ds.backbones import FAMILIES, get_adapter
>>> sorted(FAMILIES)
['internvl3_5', 'qwen2-vl', 'qwen3-vl']

Importing this package is cheap: an adapter's module (and with it torch/transformers when its methods run)
loads on the first :func:`get_adapter` call for that family.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rmpl_ds.backbones.base import MODES, LoraSettings, Mode
from rmpl_ds.errors import UserError

if TYPE_CHECKING:
    from rmpl_ds.backbones.base import BackboneAdapter

# family name -> "module:AdapterClass"; the names are the ones recipes and the CLI use.
FAMILIES: dict[str, str] = {
    "qwen2-vl": "rmpl_ds.backbones.qwen2_vl:Qwen2VLAdapter",
    "qwen3-vl": "rmpl_ds.backbones.qwen3_vl:Qwen3VLAdapter",
    "internvl3_5": "rmpl_ds.backbones.internvl:InternVLAdapter",
}

_ADAPTERS: dict[str, BackboneAdapter] = {}


def get_adapter(family: str) -> BackboneAdapter:
    """The adapter of ``family`` (one of :data:`FAMILIES`).

    Raises:
        UserError: an unknown family; the message lists the known ones.
    """
    if family not in FAMILIES:
        raise UserError(f"unknown backbone {family!r}; known backbones: {', '.join(sorted(FAMILIES))}")
    if family not in _ADAPTERS:
        module_name, class_name = FAMILIES[family].split(":")
        adapter = getattr(importlib.import_module(module_name), class_name)()
        _ADAPTERS[family] = adapter
    return _ADAPTERS[family]


__all__ = ["FAMILIES", "MODES", "LoraSettings", "Mode", "get_adapter"]
