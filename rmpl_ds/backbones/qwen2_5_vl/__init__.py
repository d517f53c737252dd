"""Qwen2.5-VL-7B-Instruct: its facts (:data:`SPEC`) and its adapter (the Qwen-VL image path with a tiny twin)."""

from rmpl_ds.backbones.qwen2_5_vl.adapter import Adapter
from rmpl_ds.backbones.qwen2_5_vl.spec import SPEC

__all__ = ["SPEC", "Adapter"]
