"""The Qwen2-VL adapter: the shared Qwen-VL image path, and the tiny twin of the full-size config."""

from __future__ import annotations

from typing import Any

from rmpl_ds.backbones.qwen_vl import QwenVLAdapter


class Adapter(QwenVLAdapter):
    # The processor class a tiny twin's preprocessor_config.json names (Qwen2.5-VL's adapter changes it).
    tiny_processor_class = "Qwen2VLProcessor"

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The full-size config shrunk to a CPU-sized model of the same class (hidden 128, 2 layers, ViT 64 wide)."""
        config = self.spec.full_size_config_dict()
        config.update(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            max_window_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            sliding_window=4096,
            # head_dim 32: the three M-RoPE sections must sum to head_dim / 2
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
            bos_token_id=token_ids["<|endoftext|>"],
            eos_token_id=token_ids["<|im_end|>"],
            pad_token_id=token_ids["<|endoftext|>"],
            vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"],
            vision_token_id=token_ids["<|vision_pad|>"],
            image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"],
        )
        self.shrink_vision(config["vision_config"])
        return config

    def shrink_vision(self, vision: dict[str, Any]) -> None:
        """The tiny twin's ViT: 64 wide, 2 blocks."""
        vision.update(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=128)

    def tiny_preprocessor(self) -> dict[str, Any]:
        """Published settings with a 112×112 pixel cap: 8×8 patches, 16 image tokens for a 512×512 image."""
        return {
            **self.spec.reference_preprocessor,
            "max_pixels": 112 * 112,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": self.tiny_processor_class,
        }
