"""InternVL3.5-8B (HF format): InternViT-300M + pixel-shuffle MLP projector + Qwen3-8B language model.

Images are cut into 448×448 tiles by ``GotOcr2ImageProcessorPil`` with the tiling rule ``InternVLProcessor``
switches on (``crop_to_patches=True``): the grid whose aspect ratio is closest to the image's, moving to a larger
grid on ties while the image covers more than half of it, plus a thumbnail when there is more than one tile.
Each tile gives (448/14)² = 1024 patches, pixel-shuffled (0.5) to **256** tokens; a 512×512 image is one tile.
The chat template writes ``<IMG_CONTEXT>`` per image, expanded to ``<img>`` + 256·tiles × ``<IMG_CONTEXT>`` +
``</img>`` as ``InternVLProcessor.replace_image_token`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rmpl_ds.backbones.base import BackboneAdapter, ImageInputs, ProcessorBundle
from rmpl_ds.backbones.qwen3_vl import Qwen3VLAdapter
from rmpl_ds.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokens_per_tile(vision_image_size: Any, patch_size: Any, downsample_ratio: float) -> int:
    """Image tokens per tile: (tile / patch)² patches, pixel-shuffled by ``downsample_ratio`` in each direction."""
    side = vision_image_size[0] if isinstance(vision_image_size, (list, tuple)) else vision_image_size
    patch = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    return int((side // patch) ** 2 * downsample_ratio**2)


class InternVLAdapter(BackboneAdapter):
    """OpenGVLab/InternVL3_5-8B-HF."""

    family: ClassVar[str] = "internvl3_5"
    model_type: ClassVar[str] = "internvl"
    model_class_name: ClassVar[str] = "InternVLForConditionalGeneration"
    image_processor_class_name: ClassVar[str] = "GotOcr2ImageProcessorPil"
    full_size_config: ClassVar[str] = "InternVL3_5-8B-HF.reconstructed.json"
    hub_name: ClassVar[str] = "OpenGVLab/InternVL3_5-8B-HF"
    # preprocessor_config.json of the published checkpoint (ImageNet normalization, 448-px tiles, ≤ 12 tiles)
    reference_preprocessor: ClassVar[dict[str, Any]] = {
        "size": {"height": 448, "width": 448},
        "crop_to_patches": False,
        "min_patches": 1,
        "max_patches": 12,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    chat_template: ClassVar[str] = _CHAT_TEMPLATE
    template_image_placeholder: ClassVar[str] = "<IMG_CONTEXT>"
    image_token: ClassVar[str] = "<IMG_CONTEXT>"
    image_start_token: ClassVar[str] = "<img>"
    image_end_token: ClassVar[str] = "</img>"
    vision_tower_prefix: ClassVar[str] = "model.vision_tower"
    projector_modules: ClassVar[tuple[str, ...]] = ("model.multi_modal_projector",)
    vision_lora_pattern: ClassVar[str] = (
        r"encoder\.layer\.\d+\.(?:attention\.(?:q_proj|k_proj|v_proj|projection_layer)|mlp\.(?:fc1|fc2))"
    )
    quantization_skip_modules: ClassVar[tuple[str, ...]] = (
        "lm_head",
        "model.vision_tower",
        "model.multi_modal_projector",
    )
    # InternVL's tokenizer is Qwen3's plus the image markers; InternVLProcessor reads the named ones.
    special_tokens: ClassVar[tuple[str, ...]] = (
        *Qwen3VLAdapter.special_tokens,
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<video>",
    )
    named_special_tokens: ClassVar[dict[str, str]] = {
        "context_image_token": "<IMG_CONTEXT>",
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "video_token": "<video>",
    }

    def configure_image_processor(self, image_processor: Any, max_image_tokens: int, config: Any) -> dict[str, Any]:
        if config is None:
            config_dict = self.full_size_config_dict()
            vision = config_dict["vision_config"]
            per_tile = tokens_per_tile(vision["image_size"], vision["patch_size"], config_dict["downsample_ratio"])
        else:
            vision = config.vision_config
            per_tile = tokens_per_tile(vision.image_size, vision.patch_size, config.downsample_ratio)
            if getattr(config, "image_seq_length", per_tile) != per_tile:
                raise UserError(
                    f"config image_seq_length={config.image_seq_length} but the vision settings give {per_tile} "
                    "tokens per tile"
                )
        # The official processor tiles (crop_to_patches=True); more than one grid tile adds a thumbnail, so a cap
        # of T tiles allows grids of at most T - 1 tiles (and 1 tile when T < 3).
        max_tiles = max(1, max_image_tokens // per_tile)
        image_processor.crop_to_patches = True
        image_processor.max_patches = min(int(image_processor.max_patches), 1 if max_tiles < 3 else max_tiles - 1)
        return {"tokens_per_tile": per_tile}

    def process_images(self, bundle: ProcessorBundle, images: Sequence[Image.Image]) -> ImageInputs:
        output = bundle.image_processor(images=list(images), return_tensors="pt")
        per_tile = bundle.extra["tokens_per_tile"]
        tokens = tuple(int(tiles) * per_tile for tiles in output["num_patches"])
        return ImageInputs(tensors={"pixel_values": output["pixel_values"]}, tokens_per_image=tokens)

    def image_token_count(self, width: int, height: int, *, bundle: ProcessorBundle | None = None) -> int:
        if bundle is not None:
            processor, per_tile = bundle.image_processor, bundle.extra["tokens_per_tile"]
        else:
            processor, per_tile = _reference_processor()
        return processor.get_number_of_image_patches(height, width, {}) * per_tile

    def dummy_image_size(self, bundle: ProcessorBundle) -> tuple[int, int]:
        size = bundle.image_processor.size
        return int(size["width"]), int(size["height"])

    def reference_image_processor(self) -> Any:
        """The published checkpoint's image processor settings, capped at the default image-token cap."""
        return _reference_processor()[0]

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The full-size config shrunk to a CPU-sized model of the same classes: 112-px tiles (16 tokens each),
        a 64-wide 2-layer InternViT and a 2-layer Qwen3 with hidden 128."""
        config = self.full_size_config_dict()
        config["text_config"].update(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            max_window_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            bos_token_id=token_ids["<|endoftext|>"],
            eos_token_id=token_ids["<|im_end|>"],
            pad_token_id=token_ids["<|endoftext|>"],
        )
        config["vision_config"].update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[112, 112],
            # the published 1e-10 would make a random tiny ViT's features constant; 0.02 keeps images visible
            initializer_range=0.02,
        )
        config.update(image_seq_length=16, image_token_id=token_ids["<IMG_CONTEXT>"])
        return config

    def tiny_preprocessor(self) -> dict[str, Any]:
        """Published settings with 112-px tiles and one tile per image (a 512×512 image is one tile, as with the
        real 448-px tiles)."""
        return {
            **self.reference_preprocessor,
            "size": {"height": 112, "width": 112},
            "max_patches": 1,
            "image_processor_type": "GotOcr2ImageProcessor",
            "processor_class": "InternVLProcessor",
        }

    def tiny_processor_config(self) -> dict[str, Any]:
        """processor_config.json of the tiny model, in the published file's shape."""
        return {"image_seq_length": 16, "processor_class": "InternVLProcessor"}


@functools.cache
def _reference_processor() -> tuple[Any, int]:
    import transformers

    adapter = InternVLAdapter()
    processor = getattr(transformers, adapter.image_processor_class_name)(**adapter.reference_preprocessor)
    extra = adapter.configure_image_processor(processor, adapter.default_max_image_tokens, None)
    return processor, extra["tokens_per_tile"]
