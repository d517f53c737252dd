"""InternVL3.5-8B (HF format): its facts (:data:`SPEC`) and its adapter (448-px tiles, pixel shuffle)."""

from rmpl_ds.backbones.internvl.adapter import Adapter
from rmpl_ds.backbones.internvl.spec import SPEC

__all__ = ["SPEC", "Adapter"]
