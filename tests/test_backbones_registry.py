"""Backbone registry and family specs, and facts about the full-size checkpoints that need no weights: parameter
counts on the meta device, image-token counts with the published image-processor settings, LoRA target names."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from rmpl_ds.backbones import FAMILIES, get_adapter, get_spec
from rmpl_ds.backbones.loading import config_from_dict, meta_parameter_count, model_class
from rmpl_ds.backbones.spec import LM_PROJECTIONS
from rmpl_ds.config import LoraConfig
from rmpl_ds.errors import UserError

# Counted by instantiating the shipped configs on the meta device (shared/model_configs/README.md).
FULL_SIZE_PARAMETERS = {
    "qwen2-vl": 8_291_375_616,
    "qwen3-vl": 8_767_123_696,
    "internvl3_5": 8_528_318_464,
    "qwen2.5-vl": 8_292_166_656,
}
# Official image-token counts for a 512×512 image (MEMORY_AND_SPEED.md §1.4).
TOKENS_AT_512 = {"qwen2-vl": 324, "qwen3-vl": 256, "internvl3_5": 256, "qwen2.5-vl": 324}


def test_registry_has_the_three_paper_backbones() -> None:
    assert {"qwen2-vl", "qwen3-vl", "internvl3_5"} <= set(FAMILIES)
    for family in FAMILIES:
        assert get_adapter(family).family == family == get_spec(family).name
        assert get_adapter(family) is get_adapter(family)
        assert get_adapter(family).spec is get_spec(family)


def test_unknown_backbone_lists_the_known_ones() -> None:
    known = ", ".join(sorted(FAMILIES))
    with pytest.raises(UserError, match=rf"unknown backbone 'qwen2-vl-7b'.*{re.escape(known)}"):
        get_adapter("qwen2-vl-7b")
    with pytest.raises(UserError, match=r"unknown backbone 'qwen2-vl-7b'"):
        get_spec("qwen2-vl-7b")


def test_one_lora_default_for_recipes_smoke_and_the_api() -> None:
    """The recipe's model.lora is what adapter.load takes: one default (rank 64, alpha 128), one place."""
    from rmpl_ds.config import ModelConfig

    assert ModelConfig(family="qwen2-vl", path="x").lora == LoraConfig() == LoraConfig(64, 128, 0.05, None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_target_problems_name_the_unknown_targets(family: str) -> None:
    spec = get_spec(family)
    assert spec.lora_target_problems(None) == []
    assert spec.lora_target_problems(("q_proj", "v_proj")) == []
    (problem,) = spec.lora_target_problems(("q_proj", "bogus"))
    assert "'bogus' unknown" in problem and "q_proj" in problem
    assert spec.lora_target_problems(()) != []


def test_a_hub_name_is_refused_with_instructions() -> None:
    with pytest.raises(UserError, match=r"not a local model directory.*never downloads.*hf download.*--tiny-model"):
        get_adapter("qwen2-vl").load_processor("Qwen/Qwen2-VL-7B-Instruct")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_parameter_count_is_exact(family: str) -> None:
    spec = get_spec(family)
    assert meta_parameter_count(spec) == spec.parameters
    if family in FULL_SIZE_PARAMETERS:  # the README's figures
        assert spec.parameters == FULL_SIZE_PARAMETERS[family]


@pytest.mark.parametrize("family", sorted(TOKENS_AT_512))
def test_512_token_count_with_published_processor_settings(family: str) -> None:
    adapter = get_adapter(family)
    assert adapter.image_token_count(512, 512) == TOKENS_AT_512[family]
    # Run the published image processor on a real 512×512 image: its output must agree with the count.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    output = adapter.reference_image_processor()(images=[image], return_tensors="pt")
    if family == "internvl3_5":
        assert tuple(output["pixel_values"].shape) == (1, 3, 448, 448)  # one tile, downscaled to 448
        assert list(output["num_patches"]) == [1]
    else:
        patch = adapter.spec.reference_preprocessor["patch_size"]
        side = 36 if patch == 14 else 32  # 512 → 504 (multiple of 28) vs 512 (multiple of 32)
        assert output["image_grid_thw"].tolist() == [[1, side, side]]
        assert tuple(output["pixel_values"].shape) == (side * side, 3 * 2 * patch * patch)
        assert side * side // 4 == TOKENS_AT_512[family]


def official_processor(family: str, image_processor: Any, tokens_per_tile: int = 256) -> Any:
    """The family's official transformers processor object without its video half (constructing one needs
    torchvision, which cannot be installed here): its image attributes are set by hand, so that its own
    ``replace_image_token`` (the code that expands the chat template's placeholder) can run."""
    import transformers

    spec = get_spec(family)
    # the processor class the family's preprocessor_config.json names
    processor = object.__new__(getattr(transformers, get_adapter(family).tiny_preprocessor()["processor_class"]))
    processor.image_token = spec.image_token
    if isinstance(processor, transformers.InternVLProcessor):
        processor.image_seq_length = tokens_per_tile
        processor.start_image_token, processor.end_image_token = spec.image_start_token, spec.image_end_token
    processor.image_processor = image_processor
    return processor


@pytest.mark.parametrize("size", [(512, 512), (800, 800), (1000, 400)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counts_equal_the_official_processor_expansion(family: str, size: tuple[int, int]) -> None:
    adapter = get_adapter(family)
    official = official_processor(family, adapter.reference_image_processor())
    output = official.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")
    expansion = official.replace_image_token(output, 0)
    assert expansion.count(official.image_token) == adapter.image_token_count(*size)
    if size == (512, 512) and family in TOKENS_AT_512:
        assert adapter.image_token_count(*size) == TOKENS_AT_512[family]


def test_internvl_tiling_rule_and_cap() -> None:
    adapter = get_adapter("internvl3_5")
    assert adapter.image_token_count(448, 448) == 256
    # Just past the tiling cliff (MEMORY_AND_SPEED.md §1.4): a 2×2 grid plus the thumbnail.
    assert adapter.image_token_count(640, 640) == 5 * 256
    assert adapter.image_token_count(800, 800) == 5 * 256
    # 1000×400 (aspect 2.5): the published processor (≤ 12 tiles) picks 5×2 + thumbnail = 11 tiles; the default cap
    # of 1280 tokens allows at most 4 grid tiles + thumbnail, where the rule picks 3×1 + thumbnail.
    assert adapter.image_token_count(1000, 400) == 4 * 256
    processor = adapter.reference_image_processor()
    assert processor.get_number_of_image_patches(400, 1000, {"max_patches": 12}) == 11


def test_qwen_image_token_cap() -> None:
    adapter = get_adapter("qwen2-vl")
    # Uncapped, the published settings would give (1988/14)² / 4 = 5041 tokens for a 2000×2000 image.
    assert 1000 < adapter.image_token_count(2000, 2000) <= adapter.spec.default_max_image_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_targets_hit_exactly_the_language_model_projections(family: str) -> None:
    spec = get_spec(family)
    config = config_from_dict(spec, spec.full_size_config_dict())
    with torch.device("meta"):
        model = model_class(spec)._from_config(config)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    layers = config.get_text_config().num_hidden_layers

    lm_only = [name for name in names if re.fullmatch(spec.lora_pattern(), name)]
    assert len(lm_only) == len(spec.lora_targets) * layers
    assert all(name.startswith(spec.language_model_prefix + ".layers.") for name in lm_only)
    assert {name.rsplit(".", 1)[-1] for name in lm_only} == set(spec.lora_targets) == set(LM_PROJECTIONS)

    attention_only = [name for name in names if re.fullmatch(spec.lora_pattern(("q_proj",)), name)]
    assert len(attention_only) == layers

    with_vision = [name for name in names if re.fullmatch(spec.lora_pattern(train_vision_tower=True), name)]
    vision = [name for name in with_vision if name.startswith(spec.vision_tower_prefix + ".")]
    # every linear of the ViT blocks (attention and MLP, whatever the family calls them), none of the projector's
    tower = [name for name in names if spec.is_vision_tower_parameter(name + ".weight")]
    assert vision == tower
    vision_layers = config.vision_config.num_hidden_layers
    assert len(vision) % vision_layers == 0 and len(vision) >= 4 * vision_layers  # attention and MLP, every block
    assert not any(spec.is_projector_parameter(name + ".weight") for name in vision)
