"""Recipe paths: relative to the recipe file's folder (per file under ``extends``), relative to the current directory
when given as an override, and the package's DeepSpeed configs by name; so `rmpl-ds check` and friends work from any
directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rmpl_ds import cli
from rmpl_ds.config import load_recipe
from rmpl_ds.ds_config import load_ds_config, packaged_config
from rmpl_ds.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAPER_RECIPE = ROOT / "launch" / "recipes" / "rmpl_qwen2vl_7b.yaml"


def recipe_dict(**paths: object) -> dict:
    return {
        "name": "paths",
        "model": {"family": "qwen2-vl", "path": "models/tiny"},
        "sources": {"ace": "shards/ace", "swig": "/absolute/swig"},
        "raw": {"ace": {"converter": "ace", "input": "raw/ace"}},
        "stages": [{"name": "s", "mixture": [{"source": "ace", "task": "t", "weight": 1}], "steps": 2, "lr": 1e-4}],
        "evaluation": {"m2e2": "~/m2e2", "images": "data/../data/images"},
        **paths,
    }


def test_relative_paths_are_relative_to_the_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(output_dir="runs/{name}")))
    monkeypatch.chdir(tmp_path)  # somewhere else
    recipe = load_recipe(Path("project/recipe.yaml"))
    assert recipe.model.path == str(folder / "models" / "tiny")
    assert recipe.sources == {"ace": str(folder / "shards" / "ace"), "swig": "/absolute/swig"}
    assert recipe.raw["ace"].input == str(folder / "raw" / "ace")
    assert recipe.evaluation.images == str(folder / "data" / "images")
    assert recipe.evaluation.m2e2 == str(Path("~/m2e2").expanduser())
    assert recipe.out_dir() == folder / "runs" / "paths"
    assert recipe.launch.deepspeed_config == "zero2"  # the default: the package's config, by name


def test_extends_resolves_each_file_against_its_own_folder(tmp_path: Path) -> None:
    base = tmp_path / "base"
    child = tmp_path / "variants" / "deep"
    base.mkdir()
    child.mkdir(parents=True)
    (base / "parent.yaml").write_text(yaml.safe_dump(recipe_dict()))
    (child / "child.yaml").write_text(
        yaml.safe_dump({"extends": "../../base/parent.yaml", "name": "child", "sources": {"swig": "my-swig"}})
    )
    recipe = load_recipe(child / "child.yaml")
    assert recipe.model.path == str(base / "models" / "tiny")  # the parent's, against the parent's folder
    assert recipe.sources == {"ace": str(base / "shards" / "ace"), "swig": str(child / "my-swig")}


def test_overrides_are_relative_to_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict()))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(tmp_path / "recipe.yaml", ["model.path=here/model", "sources.ace=../ace", "stages.s.lr=2e-4"])
    assert recipe.model.path == str(elsewhere / "here" / "model")
    assert recipe.sources["ace"] == str(tmp_path / "ace")
    assert recipe.stage("s").lr == 2e-4  # not a path: untouched


def test_deepspeed_configs_by_name_or_path(tmp_path: Path) -> None:
    assert load_ds_config("zero2")["zero_optimization"]["stage"] == 2
    assert load_ds_config("zero2_offload.json")["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert packaged_config("zero2").parent.name == "ds_configs"
    with pytest.raises(
        UserError, match=r"'zero9' is not one of the package's DeepSpeed configs \(zero2, zero2_offload\)"
    ):
        load_ds_config("zero9")
    own = tmp_path / "configs" / "mine.json"
    own.parent.mkdir()
    own.write_text(packaged_config("zero2").read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(launch={"deepspeed_config": "configs/mine.json"})))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert recipe.launch.deepspeed_config == str(own)
    assert load_ds_config(recipe.launch.deepspeed_config)["zero_optimization"]["stage"] == 2


def test_the_shipped_recipes_check_and_plan_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for recipe in sorted((ROOT / "launch" / "recipes").glob("*.yaml")):
        assert cli.main(["check", str(recipe)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"from {ROOT / 'models' / 'Qwen2-VL-7B-Instruct'}" in out and "ZeRO-2 (zero2)" in out
    assert cli.main(["plan", "--recipe", str(PAPER_RECIPE), "--json"]) == 0
    assert '"micro_batch": 2' in capsys.readouterr().out
