"""The Qwen3-VL adapter: the shared Qwen-VL image path, and the tiny twin of the full-size config."""

from __future__ import annotations

from typing import Any

from rmpl_ds.backbones.qwen_vl import QwenVLAdapter


class Adapter(QwenVLAdapter):
    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The full-size config shrunk to a CPU-sized model of the same class (hidden 128, 2 layers, ViT 64 wide,
        one DeepStack tap)."""
        config = self.spec.full_size_config_dict()
        config["text_config"].update(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            # interleaved M-RoPE sections sum to head_dim / 2
            rope_scaling={"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
            bos_token_id=token_ids["<|endoftext|>"],
            eos_token_id=token_ids["<|im_end|>"],
            pad_token_id=token_ids["<|endoftext|>"],
        )
        config["vision_config"].update(
            depth=2,
            hidden_size=64,
            num_heads=2,
            intermediate_size=128,
            out_hidden_size=128,
            deepstack_visual_indexes=[1],
            # an 8×8 learned position grid, interpolated to the patch grid like the real 48×48
            num_position_embeddings=64,
        )
        config.update(
            image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"],
            vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"],
        )
        return config

    def tiny_preprocessor(self) -> dict[str, Any]:
        """Published settings with a 128×128 pixel cap: 8×8 patches, 16 image tokens for a 512×512 image."""
        return {
            **self.spec.reference_preprocessor,
            "size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen3VLProcessor",
        }
