"""The Qwen2.5-VL adapter: the shared Qwen-VL image path (its absolute-pixel canvas included), and the tiny twin,
which is Qwen2-VL's with Qwen2.5-VL's windowed ViT."""

from __future__ import annotations

from typing import Any

from rmpl_ds.backbones.qwen2_vl.adapter import Adapter as Qwen2VLAdapter


class Adapter(Qwen2VLAdapter):
    tiny_processor_class = "Qwen2_5_VLProcessor"

    def shrink_vision(self, vision: dict[str, Any]) -> None:
        """A 64-wide 2-block ViT whose first block attends within 112-px windows and whose second attends globally."""
        vision.update(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, fullatt_block_indexes=[1]
        )
