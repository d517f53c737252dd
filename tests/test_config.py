"""Recipes: every shipped recipe and DeepSpeed config validates; bad ones list every problem with its key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rmpl_ds.backbones import FAMILIES
from rmpl_ds.config import (
    Recipe,
    apply_overrides,
    batch_plan,
    fingerprint,
    load_recipe,
    recipe_from_dict,
    to_dict,
)
from rmpl_ds.ds_config import bucket_elements, check_ds_config, fill, load_ds_config, recipe_ds_config, zero_stage
from rmpl_ds.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "rmpl_ds" / "ds_configs").glob("*.json"))


def minimal() -> dict:
    return {
        "name": "mini",
        "model": {"family": "qwen2-vl", "path": "models/x"},
        "sources": {"ace": "shards/ace", "swig": "shards/swig"},
        "stages": [
            {
                "name": "stage1",
                "mixture": [{"source": "ace", "task": "t", "weight": 1}, {"source": "swig", "task": "i", "weight": 2}],
                "steps": 10,
                "lr": 1e-4,
                "global_batch": 8,
                "micro_batch": 2,
            }
        ],
    }


def problems_of(raw: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        recipe_from_dict(raw, source="r.yaml", **kwargs)
    assert str(caught.value).startswith("r.yaml: ")
    return caught.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.stages, path
    load_ds_config(recipe.launch.deepspeed_config)
    for stage in recipe.stages:
        plan = batch_plan(stage.global_batch, stage.micro_batch, recipe.launch.world_size)
        assert plan.micro_batch * plan.accumulation * plan.world_size == stage.global_batch


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "rmpl_qwen2vl_7b.yaml"} <= names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_validates(path: Path) -> None:
    config = load_ds_config(path)
    assert config["zero_optimization"]["stage"] == 2
    # Buckets sized for 24 GB cards, not DeepSpeed's 5e8-element defaults (~1 GB each in bf16).
    assert config["zero_optimization"]["reduce_bucket_size"] <= 1e8
    assert config["zero_optimization"]["allgather_bucket_size"] <= 1e8


def test_paper_recipe_carries_the_paper_settings() -> None:
    recipe = load_recipe(ROOT / "launch" / "recipes" / "rmpl_qwen2vl_7b.yaml")
    stage1, stage2 = recipe.stages
    assert (stage1.steps, stage1.lr, stage1.global_batch) == (400, 1e-5, 16)
    assert (stage2.steps, stage2.lr, stage2.global_batch, stage2.init_from) == (800, 3e-5, 16, "stage1")
    assert [s.weight for s in stage1.mixture] == [1.0, 1.0, 1.0]
    assert [s.name for s in stage1.mixture] == ["ace:t", "swig:i", "mnre:r"]
    assert recipe.launch.world_size == 2 and recipe.model.image_size == 512 and recipe.model.dtype == "bf16"


def test_minimal_recipe_loads_with_defaults() -> None:
    recipe = recipe_from_dict(minimal())
    assert recipe.model.mode == "lora" and recipe.model.lora.rank == 64
    assert recipe.stages[0].mixture[1].name == "swig:i"
    assert recipe.out_dir() == Path("runs/mini")


def test_every_problem_is_listed_with_its_key_path() -> None:
    raw = minimal()
    raw["model"]["family"] = "llava"
    raw["model"]["lora"] = {"rank": 0, "alhpa": 3}
    raw["stages"][0]["mixture"].append({"source": "mnre", "task": "r", "weight": -1})
    raw["stages"][0]["steps"] = "ten"
    raw["stages"][0]["micro_batch"] = 3
    raw["stages"].append(dict(raw["stages"][0], name="stage2", init_from="stage9", steps=5, lr=0))
    raw["launch"] = {"gpus": 2, "workers": 1}
    problems = problems_of(raw)
    expected = [
        f"model.family: must be one of {', '.join(FAMILIES)}; got 'llava'",
        "model.lora.alhpa: unknown key (did you mean 'alpha'?)",
        "stages[0].steps: expected an integer, got 'ten'",
        "launch.workers: unknown key",
        "model.lora.rank: must be > 0, got 0",
        "stages[0].mixture[2].source: 'mnre' is not in sources ['ace', 'swig']",
        "stages[0].mixture[2].weight: must be > 0, got -1",
        "stages[0].global_batch: 8 is not divisible by micro batch 3 x world size 2 (= 6)",
        "stages[1].init_from: 'stage9' is not a stage of this recipe",
        "stages[1].lr: must be > 0, got 0",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    # A key with a type problem is not reported again by the cross-field checks.
    assert not any(p.startswith("stages[0].steps: must be") for p in problems)


def test_missing_required_keys_and_wrong_shapes() -> None:
    problems = problems_of({"name": "x", "model": {"family": "qwen3-vl"}, "sources": [], "stages": {}})
    assert "model.path: required key is missing" in problems
    assert "sources: expected a mapping, got a list" in problems
    assert "stages: expected a list, got a mapping" in problems
    assert len(problems) == 3


def test_init_from_a_later_stage_and_duplicates() -> None:
    raw = minimal()
    first = raw["stages"][0]
    raw["stages"] = [dict(first, init_from="stage1"), dict(first), dict(first, name="b")]
    raw["stages"][2]["mixture"] = [first["mixture"][0], first["mixture"][0]]
    problems = problems_of(raw)
    assert any(p.startswith("stages[0].init_from: 'stage1' is this stage or a later one") for p in problems)
    assert any(p.startswith("stages[1].name: duplicate stage name 'stage1'") for p in problems)
    assert any(p.startswith("stages[2].mixture[1]: duplicate stream 'ace:t'") for p in problems)


def test_batch_arithmetic() -> None:
    plan = batch_plan(16, 2, 2)
    assert (plan.global_batch, plan.micro_batch, plan.world_size, plan.accumulation) == (16, 2, 2, 4)
    assert batch_plan(16, 1, 16).accumulation == 1
    with pytest.raises(UserError, match=r"16 is not divisible by micro batch 3 x world size 2 \(= 6\)"):
        batch_plan(16, 3, 2)
    with pytest.raises(UserError, match="must all be >= 1"):
        batch_plan(16, 0, 2)
    # The world size the run will use is checked at load time, before any process starts.
    with pytest.raises(ConfigError, match="world size 3"):
        recipe_from_dict(minimal(), world_size=3)


def test_overrides_by_index_name_and_nested_key() -> None:
    recipe = recipe_from_dict(
        minimal(),
        overrides=[
            "stages[0].lr=3e-5",
            "stages.stage1.steps=7",
            "model.lora.targets=[q_proj, v_proj]",
            "launch.gpus=4",
        ],
        world_size=None,
    )
    assert recipe.stages[0].lr == 3e-5 and recipe.stages[0].steps == 7
    assert recipe.model.lora.targets == ("q_proj", "v_proj")
    assert recipe.launch.world_size == 4


def test_bad_overrides_are_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(minimal(), ["stages[3].lr=1", "nokeyvalue", "stages.nosuch.lr=1"])
    problems = caught.value.problems
    assert len(problems) == 3
    assert "out of range" in problems[0] and "expected key.path=value" in problems[1] and "no item named" in problems[2]
    # An override of an unknown key is caught by validation like any unknown key.
    assert problems_of(minimal(), overrides=["model.lora.rnak=8"]) == [
        "model.lora.rnak: unknown key (did you mean 'rank'?)"
    ]


def test_extends_merges_and_reports_cycles(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(minimal()))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nmodel: {mode: qlora}\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert child.name == "child" and child.model.mode == "qlora" and child.model.family == "qwen2-vl"
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nmodel: {family: qwen2-vl\nstages: []\n")
    with pytest.raises(UserError, match=r"broken\.yaml:\d+:\d+: invalid YAML"):
        load_recipe(bad)
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = recipe_from_dict(minimal()), recipe_from_dict(minimal())
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(recipe_from_dict(minimal(), overrides=["stages[0].lr=2e-4"]))
    assert to_dict(a)["stages"][0]["mixture"][0] == {"source": "ace", "task": "t", "weight": 1.0, "loss_weight": 1.0}


def test_ds_config_rules_and_fill() -> None:
    problems = check_ds_config(
        {"optimizer": {"type": "Adam"}, "train_batch_size": 32, "zero_optimization": {"stage": 3}}
    )
    assert any(p.startswith("train_batch_size: the recipe owns this value") for p in problems)
    assert any(p.startswith("optimizer: not allowed") for p in problems)
    assert any(p.startswith("zero_optimization.stage: 3 is not supported") for p in problems)
    recipe = recipe_from_dict(minimal())
    config = load_ds_config(ROOT / "rmpl_ds" / "ds_configs" / "zero2.json")
    filled = fill(config, recipe.stages[0], batch_plan(8, 2, 2), bf16=True)
    assert filled["train_batch_size"] == 8 and filled["gradient_accumulation_steps"] == 2
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["bf16"]["enabled"] is True
    assert filled["gradient_clipping"] == 1.0
    assert config["train_batch_size"] == "auto"  # the loaded file is not modified
    assert "auto" not in json.dumps(filled)


def test_reduce_bucket_is_capped_at_the_trainable_parameters() -> None:
    """DeepSpeed allocates the bucket (x2 with overlap_comm) at every backward: never larger than the gradients."""
    recipe = recipe_from_dict(minimal())
    config = load_ds_config(ROOT / "rmpl_ds" / "ds_configs" / "zero2.json")
    plan = batch_plan(8, 2, 2)
    small = fill(config, recipe.stages[0], plan, bf16=True, trainable_params=1_344_640)
    assert small["zero_optimization"]["reduce_bucket_size"] == 1_344_640
    lora_7b = fill(config, recipe.stages[0], plan, bf16=True, trainable_params=161_480_704)
    assert lora_7b["zero_optimization"]["reduce_bucket_size"] == 50_000_000  # the file's value
    assert fill(config, recipe.stages[0], plan, bf16=True)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert bucket_elements(5e8, 10) == 10 and bucket_elements(5e7, 0) == 1


def test_launch_zero_stage_overrides_the_deepspeed_config() -> None:
    default = recipe_from_dict(minimal())
    assert default.launch.zero_stage is None
    assert zero_stage(recipe_ds_config(default.launch)) == 2  # the package's zero2 config
    for stage in (0, 1, 2):
        recipe = recipe_from_dict(minimal(), overrides=[f"launch.zero_stage={stage}"])
        config = recipe_ds_config(recipe.launch)
        assert zero_stage(config) == stage
        assert config["zero_optimization"]["reduce_bucket_size"] == 50_000_000  # the rest of the file kept
    with pytest.raises(ConfigError, match=r"launch\.zero_stage: must be 0, 1, 2 or null"):
        recipe_from_dict(minimal(), overrides=["launch.zero_stage=3"])
