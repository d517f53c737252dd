"""Qwen2-VL-7B-Instruct, and the Qwen-VL image path shared with Qwen3-VL.

Images: ``Qwen2VLImageProcessorPil`` resizes to multiples of patch × merge (28 px here: 512 → 504), cuts
14-px patches (each duplicated over the temporal patch of 2) and reports the patch grid; the language model sees
``grid_t · grid_h · grid_w / merge²`` tokens per image: 36·36/4 = **324** at 512×512. The chat template writes
``<|vision_start|><|image_pad|><|vision_end|>`` per image and the single ``<|image_pad|>`` is repeated once per
image token, as ``Qwen2VLProcessor.replace_image_token`` does. M-RoPE needs ``mm_token_type_ids`` (1 on image
tokens) next to ``image_grid_thw``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rmpl_ds.backbones.base import BackboneAdapter, ImageInputs, ProcessorBundle

if TYPE_CHECKING:
    from PIL import Image

# OpenAI CLIP normalization, the Qwen2-VL processor's default.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen_chat_template(default_system: str | None) -> str:
    """The Qwen-VL chat format for system / user / assistant turns whose content is a string or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts (what :meth:`Example.messages` produces)."""
    parts = ["{% for message in messages %}"]
    if default_system:
        parts.append(
            "{% if loop.first and message['role'] != 'system' %}"
            "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}"
            "{% endif %}"
        )
    parts.append(
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return "".join(parts)


class QwenVLAdapter(BackboneAdapter):
    """What Qwen2-VL and Qwen3-VL share: the patch-grid image path, the markers and M-RoPE's modality ids."""

    image_processor_class_name: ClassVar[str] = "Qwen2VLImageProcessorPil"
    template_image_placeholder: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    image_token: ClassVar[str] = "<|image_pad|>"
    image_start_token: ClassVar[str] = "<|vision_start|>"
    image_end_token: ClassVar[str] = "<|vision_end|>"
    vision_tower_prefix: ClassVar[str] = "model.visual"
    quantization_skip_modules: ClassVar[tuple[str, ...]] = ("lm_head", "model.visual")
    uses_mm_token_type_ids: ClassVar[bool] = True
    special_tokens: ClassVar[tuple[str, ...]] = _QWEN_SPECIAL_TOKENS
    named_special_tokens: ClassVar[dict[str, str]] = {}

    def configure_image_processor(self, image_processor: Any, max_image_tokens: int, config: Any) -> dict[str, Any]:
        # One LLM token covers a (patch·merge)² pixel square, so the pixel cap is tokens × factor²;
        # smart_resize keeps h·w ≤ longest_edge, hence tokens ≤ the cap.
        factor = image_processor.patch_size * image_processor.merge_size
        longest = min(int(image_processor.size["longest_edge"]), max_image_tokens * factor * factor)
        shortest = min(int(image_processor.size["shortest_edge"]), longest)
        image_processor.size = type(image_processor.size)(shortest_edge=shortest, longest_edge=longest)
        return {}

    def process_images(self, bundle: ProcessorBundle, images: Sequence[Image.Image]) -> ImageInputs:
        processor = bundle.image_processor
        output = processor(images=list(images), return_tensors="pt")
        grid = output["image_grid_thw"]
        merge_area = processor.merge_size**2
        tokens = tuple(int(row.prod()) // merge_area for row in grid)
        return ImageInputs(
            tensors={"pixel_values": output["pixel_values"], "image_grid_thw": grid}, tokens_per_image=tokens
        )

    def image_token_count(self, width: int, height: int, *, bundle: ProcessorBundle | None = None) -> int:
        processor = bundle.image_processor if bundle is not None else self.reference_image_processor()
        return processor.get_number_of_image_patches(height, width, {}) // processor.merge_size**2

    def dummy_image_size(self, bundle: ProcessorBundle) -> tuple[int, int]:
        factor = bundle.image_processor.patch_size * bundle.image_processor.merge_size
        return factor, factor

    def reference_image_processor(self) -> Any:
        """The published checkpoint's image processor settings, capped at the default image-token cap."""
        return _reference_processor(type(self))


@functools.cache
def _reference_processor(adapter_class: type[BackboneAdapter]) -> Any:
    import transformers

    adapter = adapter_class()
    processor = getattr(transformers, adapter.image_processor_class_name)(**adapter.reference_preprocessor)
    adapter.configure_image_processor(processor, adapter.default_max_image_tokens, None)
    return processor


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen/Qwen2-VL-7B-Instruct: Qwen2-7B language model, 675 M-parameter ViT (patch 14) with a 2×2 merger."""

    family: ClassVar[str] = "qwen2-vl"
    model_type: ClassVar[str] = "qwen2_vl"
    model_class_name: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    full_size_config: ClassVar[str] = "Qwen2-VL-7B-Instruct.json"
    hub_name: ClassVar[str] = "Qwen/Qwen2-VL-7B-Instruct"
    # preprocessor_config.json of the published checkpoint
    reference_preprocessor: ClassVar[dict[str, Any]] = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
    }
    chat_template: ClassVar[str] = _qwen_chat_template(default_system="You are a helpful assistant.")
    projector_modules: ClassVar[tuple[str, ...]] = ("model.visual.merger",)
    vision_lora_pattern: ClassVar[str] = r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))"

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The full-size config shrunk to a CPU-sized model of the same class (hidden 128, 2 layers, ViT 64 wide)."""
        config = self.full_size_config_dict()
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
        config["vision_config"].update(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=128)
        return config

    def tiny_preprocessor(self) -> dict[str, Any]:
        """Published settings with a 112×112 pixel cap: 8×8 patches, 16 image tokens for a 512×512 image."""
        return {
            **self.reference_preprocessor,
            "max_pixels": 112 * 112,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
        }
