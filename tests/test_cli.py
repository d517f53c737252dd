"""The `rmpl-ds` front: help for every subcommand, version, and user errors as one message with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rmpl_ds import __version__
from rmpl_ds.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([name, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rmpl-ds {name}")


def test_top_level_help_lists_every_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rmpl_ds", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    for name in SUBCOMMANDS:
        assert f"    {name} " in result.stdout or f"    {name}\n" in result.stdout, name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"rmpl-ds {__version__}"


def test_malformed_recipe_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nmodel: {family: qwen2-vl, path: m, lora: {rank: -1}}\nsources: {ace: a}\n"
        "stages:\n  - {name: s, steps: 0, lr: 1e-5, mixture: [{source: ace, task: t, weight: -1}]}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "rmpl_ds", "check", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}: 3 problems:" in result.stderr
    for line in (
        "model.lora.rank: must be > 0, got -1",
        "stages[0].steps: must be > 0, got 0",
        "stages[0].mixture[0].weight: must be > 0, got -1",
    ):
        assert line in result.stderr


def test_a_bad_lora_target_is_refused_at_recipe_load_with_the_other_problems() -> None:
    """Before any process starts: `rmpl-ds check` names model.lora.targets (and the unknown name) next to the
    other problems, exit 2."""
    recipe = ROOT / "launch/recipes/rmpl_qwen2vl_7b.yaml"
    command = [
        sys.executable, "-m", "rmpl_ds", "check", str(recipe),
        "model.lora.targets=[q_proj,bogus]", "model.family=qwen3-vl", "stages.stage1.lr=-1",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "2 problems:" in result.stderr
    assert "model.lora.targets: must be a non-empty subset of qwen3-vl's language-model projections" in result.stderr
    assert "('bogus' unknown)" in result.stderr
    assert "stages[0].lr: must be > 0" in result.stderr
    unknown_family = subprocess.run(
        [sys.executable, "-m", "rmpl_ds", "check", str(recipe), "model.family=qwen9-vl"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert unknown_family.returncode == 2
    assert "model.family: must be one of qwen2-vl, qwen3-vl, internvl3_5" in unknown_family.stderr
    assert "got 'qwen9-vl'" in unknown_family.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rmpl_ds", "--debug", "check", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "recipe file not found" in result.stderr


def test_check_prints_the_batch_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["check", str(ROOT / "launch/recipes/rmpl_qwen2vl_7b.yaml"), "--gpus", "4", "stages.stage1.micro_batch=1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "batch 16 = micro 1 x accumulation 4 x world 4" in out
