"""Qwen3-VL-8B-Instruct: the Qwen-VL image path with 16-px patches (factor 32, so 512 stays 512).

512×512 → a 32×32 patch grid → **256** image tokens after the 2×2 merge. The merger and the three DeepStack
mergers (which feed ViT layers 8/16/24 into the first LLM layers) together form the projector.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rmpl_ds.backbones.qwen2_vl import _QWEN_SPECIAL_TOKENS, QwenVLAdapter, _qwen_chat_template


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen/Qwen3-VL-8B-Instruct: Qwen3-8B-style language model (interleaved M-RoPE), 576 M-parameter ViT."""

    family: ClassVar[str] = "qwen3-vl"
    model_type: ClassVar[str] = "qwen3_vl"
    model_class_name: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    full_size_config: ClassVar[str] = "Qwen3-VL-8B-Instruct.json"
    hub_name: ClassVar[str] = "Qwen/Qwen3-VL-8B-Instruct"
    # preprocessor_config.json of the published checkpoint (min/max pixels as shortest/longest edge)
    reference_preprocessor: ClassVar[dict[str, Any]] = {
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    # The Instruct model's template adds no default system turn (and no thinking block).
    chat_template: ClassVar[str] = _qwen_chat_template(default_system=None)
    projector_modules: ClassVar[tuple[str, ...]] = ("model.visual.merger", "model.visual.deepstack_merger_list")
    vision_lora_pattern: ClassVar[str] = r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:linear_fc1|linear_fc2))"
    special_tokens: ClassVar[tuple[str, ...]] = (
        *_QWEN_SPECIAL_TOKENS,
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
    )

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The full-size config shrunk to a CPU-sized model of the same class (hidden 128, 2 layers, ViT 64 wide,
        one DeepStack tap)."""
        config = self.full_size_config_dict()
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
            **self.reference_preprocessor,
            "size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen3VLProcessor",
        }
