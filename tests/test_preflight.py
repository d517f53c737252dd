"""Preflight (rmpl_ds.preflight): every problem a run would hit is listed at once, before a process, a model or a
run folder exists, by `rmpl-ds check --deep`, `rmpl-ds train` and `rmpl-ds pipeline` alike (exit 2)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rmpl_ds import cli, preflight

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path: Path, **changes: Any) -> Path:
    """A small two-stage recipe with absolute paths; ``changes`` replace top-level sections."""
    recipe = {
        "name": "preflight-test",
        "output_dir": str(tmp_path / "run"),
        "model": {"family": "qwen2-vl", "path": str(tmp_path / "model"), "mode": "lora", "max_seq_len": 512},
        "sources": {"ace": str(tmp_path / "shards" / "ace"), "swig": str(tmp_path / "shards" / "swig")},
        "stages": [
            {
                "name": "stage1",
                "mixture": [{"source": "ace", "task": "t", "weight": 1}, {"source": "swig", "task": "i", "weight": 1}],
                "steps": 2,
                "lr": 1e-3,
                "global_batch": 2,
                "micro_batch": 1,
            },
            {
                "name": "stage2",
                "init_from": "stage1",
                "mixture": [{"source": "ace", "task": "EM", "weight": 1}],
                "steps": 2,
                "lr": 1e-3,
                "global_batch": 2,
                "micro_batch": 1,
            },
        ],
        "launch": {"gpus": 2, "deepspeed_config": "zero2", "num_workers": 0},
        "evaluation": {"m2e2": str(tmp_path / "m2e2"), "images": str(tmp_path / "m2e2-images")},
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def files_under(path: Path) -> list[str]:
    return sorted(str(item.relative_to(path)) for item in path.rglob("*"))


def refused(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def demo(tiny_model_dir: Callable[[str], Path], demo_shards: dict[str, Path]) -> dict[str, Path]:
    """The demo's tiny model, shard sets and raw M2E2 files (annotations + images), all read-only."""
    raw = demo_shards["ace"].parents[1] / "raw"
    return {
        "model": tiny_model_dir("qwen2-vl"),
        "ace": demo_shards["ace"],
        "swig": demo_shards["swig"],
        "m2e2": raw / "m2e2" / "m2e2_annotations",
        "m2e2_images": raw / "m2e2" / "image",
    }


def complete_recipe(tmp_path: Path, demo: dict[str, Path], **changes: Any) -> Path:
    sections = {
        "model": {"family": "qwen2-vl", "path": str(demo["model"]), "mode": "lora", "max_seq_len": 512},
        "sources": {"ace": str(demo["ace"]), "swig": str(demo["swig"])},
        "evaluation": {"m2e2": str(demo["m2e2"]), "images": str(demo["m2e2_images"]), "limit": 4},
    }
    return write_recipe(tmp_path, **(sections | changes))


def test_check_deep_lists_every_missing_input_at_once_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path)
    before = files_under(tmp_path)
    assert cli.main(["check", str(recipe)]) == 0  # the recipe itself is fine ...
    assert "--deep also checks" in capsys.readouterr().out
    error = refused(capsys, cli.main(["check", str(recipe), "--deep"]))  # ... its files are not
    assert "4 problems found before anything started (nothing was created)" in error
    assert f"model.path: {tmp_path / 'model'} does not exist" in error
    assert "hf download Qwen/Qwen2-VL-7B-Instruct --local-dir" in error
    assert f"sources.ace: no shard set at {tmp_path / 'shards' / 'ace'}" in error
    assert "rmpl-ds shards build --source ace --input ... --out" in error
    assert "sources.swig: no shard set" in error
    assert "evaluation.m2e2:" in error
    assert files_under(tmp_path) == before


def test_check_deep_passes_on_the_demo_inputs(
    tmp_path: Path, demo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = complete_recipe(tmp_path, demo)
    assert cli.main(["check", str(recipe), "--deep"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("GiB") and "ok: model, shard sets, evaluation data and output directory" in out
    assert not (tmp_path / "run").exists()


def test_train_of_stage2_alone_needs_stage1s_export_and_starts_nothing(
    tmp_path: Path, demo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = complete_recipe(tmp_path, demo)
    error = refused(capsys, cli.main(["train", str(recipe), "--stage", "stage2"]))
    assert "stages.stage2.init_from:" in error and "run stage stage1 first" in error
    assert "model.path" not in error  # stage 2 starts from the export, not the base model
    assert not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()


def test_train_reports_a_model_of_another_family_with_the_shard_problems(
    tmp_path: Path, demo: dict[str, Path], tiny_model_dir: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged-swig"
    shutil.copytree(demo["swig"], damaged)
    tar = sorted(damaged.glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    recipe = write_recipe(
        tmp_path,
        model={"family": "qwen2-vl", "path": str(tiny_model_dir("internvl3_5")), "mode": "lora"},
        sources={"ace": str(tmp_path / "missing"), "swig": str(damaged)},
    )
    error = refused(capsys, cli.main(["train", str(recipe), "--stage", "stage1"]))
    assert "3 problems" in error
    assert "model.path:" in error and "model_type 'internvl'" in error
    assert "sources.ace: no shard set" in error
    assert f"sources.swig: {damaged} is damaged" in error
    assert not (tmp_path / "run").exists()


def test_pipeline_checks_the_evaluation_images_before_building_or_training(
    tmp_path: Path, demo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    empty_images = tmp_path / "no-images"
    empty_images.mkdir()
    recipe = complete_recipe(
        tmp_path,
        demo,
        sources={"ace": str(tmp_path / "to-build" / "ace"), "swig": str(demo["swig"])},
        raw={"ace": {"converter": "ace", "input": str(tmp_path / "no-such-ace")}},
    )
    spec = yaml.safe_load(recipe.read_text())
    spec["evaluation"]["images"] = str(empty_images)
    recipe.write_text(yaml.safe_dump(spec))
    error = refused(capsys, cli.main(["pipeline", str(recipe)]))
    assert f"raw.ace.input: {tmp_path / 'no-such-ace'} does not exist" in error
    assert "evaluation.images:" in error and "annotated M2E2 image(s) missing" in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "to-build").exists()


def test_output_space_is_estimated_and_checked(
    tmp_path: Path, demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rmpl_ds.config import load_recipe

    recipe = load_recipe(complete_recipe(tmp_path, demo))
    scope = preflight.Scope(stages=("stage1",), run_dir=tmp_path / "run", world_size=2)
    needed = preflight.planned_bytes(recipe, recipe.stages[:1])
    assert needed is not None and needed > 0
    assert preflight.preflight(recipe, scope) == []
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, needed - 1))
    (problem,) = preflight.preflight(recipe, scope)
    assert problem.startswith(f"output_dir: {tmp_path / 'run'} needs about")


def test_an_output_directory_that_cannot_be_created_is_a_problem(tmp_path: Path, demo: dict[str, Path]) -> None:
    from rmpl_ds.config import load_recipe

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    recipe = load_recipe(complete_recipe(tmp_path, demo))
    scope = preflight.Scope(stages=("stage1",), run_dir=blocker / "run", world_size=2)
    assert preflight.preflight(recipe, scope) == [
        f"output_dir: {blocker / 'run'} cannot be created or written ({blocker} is not a writable directory)"
    ]


def test_a_text_only_evaluation_needs_no_images(tmp_path: Path, demo: dict[str, Path]) -> None:
    """M2E2's images are not distributed with its annotations: evaluation.settings [text] does not read them."""
    from rmpl_ds.config import load_recipe

    recipe = load_recipe(
        complete_recipe(
            tmp_path,
            demo,
            evaluation={"m2e2": str(demo["m2e2"]), "images": str(tmp_path / "none"), "settings": ["text"]},
        )
    )
    assert preflight.evaluation_problems(recipe) == []
    with_images = load_recipe(
        complete_recipe(tmp_path, demo, evaluation={"m2e2": str(demo["m2e2"]), "images": str(tmp_path / "none")})
    )
    (problem,) = preflight.evaluation_problems(with_images)
    assert problem.startswith(f"evaluation.images: {tmp_path / 'none'}: not a directory")
