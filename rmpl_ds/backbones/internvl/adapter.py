"""The InternVL adapter: tiles through ``GotOcr2ImageProcessorPil``, and the tiny twin of the full-size config."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rmpl_ds.backbones.adapter import BackboneAdapter, ImageInputs, ProcessorBundle
from rmpl_ds.backbones.internvl.spec import tokens_per_tile
from rmpl_ds.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


class Adapter(BackboneAdapter):
    def configure_image_processor(self, image_processor: Any, max_image_tokens: int, config: Any) -> dict[str, Any]:
        if config is None:
            config_dict = self.spec.full_size_config_dict()
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
            processor, per_tile = _reference_processor(self)
        return processor.get_number_of_image_patches(height, width, {}) * per_tile

    def dummy_image_size(self, bundle: ProcessorBundle) -> tuple[int, int]:
        size = bundle.image_processor.size
        return int(size["width"]), int(size["height"])

    def reference_image_processor(self) -> Any:
        """The published checkpoint's image processor settings, capped at the default image-token cap."""
        return _reference_processor(self)[0]

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The full-size config shrunk to a CPU-sized model of the same classes: 112-px tiles (16 tokens each),
        a 64-wide 2-layer InternViT and a 2-layer Qwen3 with hidden 128."""
        config = self.spec.full_size_config_dict()
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
            **self.spec.reference_preprocessor,
            "size": {"height": 112, "width": 112},
            "max_patches": 1,
            "image_processor_type": "GotOcr2ImageProcessor",
            "processor_class": "InternVLProcessor",
        }

    def tiny_processor_config(self) -> dict[str, Any]:
        """processor_config.json of the tiny model, in the published file's shape."""
        return {"image_seq_length": 16, "processor_class": "InternVLProcessor"}


@functools.cache
def _reference_processor(adapter: Adapter) -> tuple[Any, int]:
    import transformers

    spec = adapter.spec
    processor = getattr(transformers, spec.image_processor_class)(**spec.reference_preprocessor)
    extra = adapter.configure_image_processor(processor, spec.default_max_image_tokens, None)
    return processor, extra["tokens_per_tile"]
