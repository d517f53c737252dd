"""The Qwen-VL image path, shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

``Qwen2VLImageProcessorPil`` resizes an image to multiples of patch × merge (``smart_resize``), cuts patches (each
duplicated over the temporal patch of 2) and reports the patch grid; the language model sees
``grid_t · grid_h · grid_w / merge²`` tokens per image. The chat template writes
``<|vision_start|><|image_pad|><|vision_end|>`` per image and the single ``<|image_pad|>`` is repeated once per
image token, as ``Qwen2VLProcessor.replace_image_token`` does. M-RoPE needs ``mm_token_type_ids`` (1 on image
tokens) next to ``image_grid_thw``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rmpl_ds.backbones.adapter import BackboneAdapter, ImageInputs, ProcessorBundle
from rmpl_ds.backbones.spec import VisionGeometry

if TYPE_CHECKING:
    from PIL import Image

# OpenAI CLIP normalization, the Qwen2-VL and Qwen2.5-VL processors' default.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json of the published Qwen2-VL-7B-Instruct and Qwen2.5-VL-7B-Instruct checkpoints (the same).
QWEN2_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}

# The special tokens every Qwen-VL tokenizer has (Qwen2-VL's set).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
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
# What Qwen2.5's tokenizer adds (tool calls, fill-in-the-middle); Qwen3's adds thinking on top.
# The code-completion tokens of the Qwen2.5 and Qwen3 tokenizers.
QWEN_FIM_TOKENS: tuple[str, ...] = (
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN2_5_EXTRA_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>", *QWEN_FIM_TOKENS)

# The Qwen-VL image markers, as every Qwen-VL spec names them.
QWEN_IMAGE_TOKENS = {
    "image_token": "<|image_pad|>",
    "image_start_token": "<|vision_start|>",
    "image_end_token": "<|vision_end|>",
    "template_image_placeholder": "<|vision_start|><|image_pad|><|vision_end|>",
    "image_processor_class": "Qwen2VLImageProcessorPil",
    "vision_tower_prefix": "model.visual",
    "uses_mm_token_type_ids": True,
}


def qwen_chat_template(default_system: str | None) -> str:
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


def merge_geometry(hf_config: Any) -> VisionGeometry:
    """The planner's view of a Qwen-VL vision tower (patch grid, ``merge²`` patches per LLM token). Qwen2-VL names
    the width ``embed_dim`` and the MLP by ratio; Qwen2.5-VL and Qwen3-VL give ``hidden_size`` and
    ``intermediate_size``."""
    vision = hf_config.vision_config
    width = getattr(vision, "embed_dim", None) or vision.hidden_size
    mlp_ratio = getattr(vision, "mlp_ratio", None)
    return VisionGeometry(
        "merge",
        depth=vision.depth,
        width=width,
        mlp_width=int(width * mlp_ratio) if mlp_ratio else vision.intermediate_size,
        heads=vision.num_heads,
        patch=vision.patch_size,
        merge=vision.spatial_merge_size,
    )


class QwenVLAdapter(BackboneAdapter):
    """The patch-grid image path, the markers and M-RoPE's modality ids."""

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

    def canvas(self, image_processor: Any, image_size: int | None) -> Any:
        return functools.partial(
            _resized_size,
            image_size=image_size,
            factor=image_processor.patch_size * image_processor.merge_size,
            min_pixels=int(image_processor.size["shortest_edge"]),
            max_pixels=int(image_processor.size["longest_edge"]),
        )

    def reference_image_processor(self) -> Any:
        """The published checkpoint's image processor settings, capped at the default image-token cap."""
        return _reference_processor(self)


def _resized_size(
    width: int, height: int, *, image_size: int | None, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(width, height) of an image of the record's size as the model sees it: the protocol resize to
    ``image_size`` squared (when set), then ``smart_resize``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if image_size is not None:
        width = height = image_size
    resized_height, resized_width = smart_resize(height, width, factor, min_pixels, max_pixels)
    return resized_width, resized_height


@functools.cache
def _reference_processor(adapter: QwenVLAdapter) -> Any:
    import transformers

    spec = adapter.spec
    processor = getattr(transformers, spec.image_processor_class)(**spec.reference_preprocessor)
    adapter.configure_image_processor(processor, spec.default_max_image_tokens, None)
    return processor
