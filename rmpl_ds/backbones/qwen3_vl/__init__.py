"""Qwen3-VL-8B-Instruct: its facts (:data:`SPEC`) and its adapter (the Qwen-VL image path with a tiny twin)."""

from rmpl_ds.backbones.qwen3_vl.adapter import Adapter
from rmpl_ds.backbones.qwen3_vl.spec import SPEC

__all__ = ["SPEC", "Adapter"]
