"""Qwen2.5-VL-7B, the fourth family: its pixels equal the official image processor's, its token counts, its recipe and
its absolute-pixel boxes. (The family-generic tests cover it too: registry and spec invariants, encode, the 4 x 3
grid of load modes, export, the lean path, grounding round trips.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rmpl_ds.backbones import get_adapter, get_spec
from rmpl_ds.config import load_recipe
from rmpl_ds.example import Example
from rmpl_ds.plan import PlanSettings, plan_memory, plan_recipe
from rmpl_ds.records import ImageEvent, ImageRecord, VisualArgument
from rmpl_ds.tasks import parse, render, to_structure

FAMILY = "qwen2.5-vl"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def published_dir(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the published checkpoint's preprocessor_config.json (what `hf download` brings)."""
    model_dir = tmp_path_factory.mktemp("qwen2.5-published") / "model"
    shutil.copytree(tiny_model_dir(FAMILY), model_dir)
    published = {
        **get_spec(FAMILY).reference_preprocessor,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (model_dir / "preprocessor_config.json").write_text(json.dumps(published))
    return model_dir


def _photo(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("size", "image_size"), [((512, 512), 512), ((800, 533), 512), ((800, 533), None)])
def test_pixels_equal_the_official_image_processor(
    published_dir: Path, size: tuple[int, int], image_size: int | None
) -> None:
    """encode's pixel_values and patch grid are the official Qwen2VLImageProcessor's (the one Qwen2_5_VLProcessor
    holds, published settings) on the image after the paper's resize, to the last value."""
    from transformers import Qwen2VLImageProcessorPil

    adapter = get_adapter(FAMILY)
    bundle = adapter.load_processor(published_dir, image_size=image_size, max_image_tokens=16384)
    image = _photo(*size)
    example = Example(task="i", system="s", prompt="p", target="none", images=(image,), key="k", source="t", meta={})
    encoded = bundle.encode(example, max_seq_len=8192)
    official = Qwen2VLImageProcessorPil(**get_spec(FAMILY).reference_preprocessor)
    expected = official(images=[adapter.protocol_resize(image, image_size)], return_tensors="pt")
    assert torch.equal(encoded["image_grid_thw"], expected["image_grid_thw"])
    assert float((encoded["pixel_values"] - expected["pixel_values"]).abs().max()) == 0.0
    grid = expected["image_grid_thw"][0].tolist()
    assert encoded["image_tokens"] == (grid[0] * grid[1] * grid[2] // 4,)
    if image_size == 512:
        assert grid == [1, 36, 36] and encoded["image_tokens"] == (324,)  # 512 -> 504 = 36 patches of 14 px
    else:
        assert grid == [1, 38, 58]  # 533 x 800 -> 532 x 812: multiples of 28


def test_token_counts_and_plan() -> None:
    adapter = get_adapter(FAMILY)
    assert adapter.image_token_count(512, 512) == 324
    assert adapter.image_token_count(2000, 2000) <= get_spec(FAMILY).default_max_image_tokens
    plan = plan_memory(PlanSettings(get_spec(FAMILY).size_name, image_size=512, seq_len=2048, micro_batch=2))
    assert plan.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert plan.image_tokens == 324
    assert plan.params.total == get_spec(FAMILY).parameters == 8_292_166_656
    assert plan.fits


def test_the_paper_recipe_differs_from_qwen2_vl_only_in_the_backbone() -> None:
    recipe = load_recipe(ROOT / "launch/recipes/rmpl_qwen2_5vl_7b.yaml")
    main = load_recipe(ROOT / "launch/recipes/rmpl_qwen2vl_7b.yaml")
    assert (recipe.model.family, recipe.model.path) == (FAMILY, str(ROOT / "models" / "Qwen2.5-VL-7B-Instruct"))
    assert recipe.stages == main.stages and recipe.sources == main.sources
    assert recipe.tasks.box_format == "native"
    plan = plan_recipe(recipe)  # models/ is absent: planned from the shipped full-size config
    assert plan.fits and plan.margin_gib > 1.5


def test_boxes_are_absolute_pixels_of_the_resized_image(tiny_model_dir: Callable[[str], Path]) -> None:
    """The tiny model's processor caps images at 112 x 112 pixels, so its canvas is 112 x 112; the published one's is
    504 x 504. Either way a rendered box reads back to the record's pixels within one canvas pixel."""
    record = ImageRecord(
        "img", "m2e2", "test", "img.jpg", 1000, 800,
        (ImageEvent("Conflict:Attack", (VisualArgument("Attacker", (100, 80, 600, 720)),)),),
    )  # fmt: skip
    image = Image.new("RGB", (100, 80))
    tiny = get_adapter(FAMILY).load_processor(tiny_model_dir(FAMILY)).box_syntax("native")
    published = get_adapter(FAMILY).native_box_syntax(get_adapter(FAMILY).reference_image_processor(), 512)
    for syntax, canvas, written in ((tiny, 112, "[11, 11, 67, 100]"), (published, 504, "[50, 50, 302, 453]")):
        assert syntax.grid(1000, 800) == (canvas, canvas)
        example = render(record, "AR", image=image, event_type="Conflict:Attack", boxes=syntax)
        assert example.target == f'{{"bbox_2d": {written}, "label": "Attacker"}}'
        parsed = parse("AR", example.target, example_meta=example.meta, boxes=syntax)
        assert parsed == to_structure(record, "AR", event_type="Conflict:Attack", boxes=syntax)
        (argument,) = parsed.events[0].arguments
        assert all(abs(a - b) <= 1000 / canvas for a, b in zip(argument.box, (100, 80, 600, 720), strict=True))
