"""Shared pytest fixtures. Each section says who uses it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Hypothesis (test_collate, test_mixing, test_plan, test_scorer, test_tasks): no example database, and its caches in
# a temporary directory removed at the end of the session, so that nothing is written into the repository.

_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="rmpl-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("rmpl", database=None)
settings.load_profile("rmpl")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The real dataset samples (test_sources_*, test_shards_cli, test_tasks, test_scorer, test_report): the project's
# shared/fixtures/real, found in one place. $RMPL_SHARED_DIR wins (the mutation harness runs the suite in a copy of
# the repository); else shared/ beside the repository, or inside it.

SHARED_ENV = "RMPL_SHARED_DIR"


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """``shared/fixtures/real``: samples of the real ACE 2005, imSitu, SWiG, MNRE and M2E2 files (read-only)."""
    candidates = (
        [Path(os.environ[SHARED_ENV])] if os.environ.get(SHARED_ENV) else [ROOT.parent / "shared", ROOT / "shared"]
    )
    shared = next((path for path in candidates if (path / "fixtures" / "real").is_dir()), None)
    if shared is None:
        pytest.fail(
            f"no fixtures/real in {' or '.join(map(str, candidates))}; set ${SHARED_ENV} to the project's shared/"
        )
    return shared / "fixtures" / "real"


# ---------------------------------------------------------------------------------------------------------------
# Backbones: tiny offline model directories (rmpl_ds.backbones.tiny), built at most once per session and family.
# Every test that needs a real from_pretrained directory takes `tiny_model_dir` and calls it with a family name.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family) -> Path`` of that family's tiny random-init HF directory (seed 0); read-only."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            from rmpl_ds.backbones.tiny import build_tiny

            built[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}") / "model", seed=0)
        return built[family]

    return get


# ---------------------------------------------------------------------------------------------------------------
# Launcher tests (test_train.py, test_reliability.py, test_elastic.py): shard sets of a small demo set, built once per
# session with the real converters and read-only afterwards, and the tiny Stage I recipe they all run.


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"ace": dir, "swig": dir, "mnre": dir}``: shards of ``write_demo(size=40, seed=0)``."""
    from rmpl_ds.commands.shards import build
    from rmpl_ds.sources.demo import write_demo

    base = tmp_path_factory.mktemp("demo-shards")
    raw = base / "raw"
    write_demo(raw, seed=0, size=40)
    shards = {}
    for name, source, images in (
        ("ace", raw / "ace", None),
        ("swig", raw / "swig" / "SWiG_jsons", raw / "swig" / "images_512"),
        ("mnre", raw / "mnre" / "mnre_txt", raw / "mnre" / "img_org"),
    ):
        shards[name] = base / "shards" / name
        assert build(name, source, out_dir=shards[name], images_dir=images) == 0
    return shards


@pytest.fixture(scope="session")
def launcher_recipe(tiny_model_dir, demo_shards) -> Callable[..., Path]:
    """``launcher_recipe(directory, name, steps=, keep_last=, later_stages=()) -> Path`` of a ``recipe.yaml`` written
    there: the tiny Qwen2-VL with LoRA (dropout 0.1), the demo shards, a Stage I mixing ace:t, swig:i and mnre:r
    1:1:1 (global batch 4 of micro batches of 1, lr 2e-3 after 2 warmup steps, a checkpoint every 2 steps) on 2
    ranks; each of ``later_stages`` is a stage with those settings and its own name, mixture and changes."""

    def write(directory: Path, name: str, *, steps: int, keep_last: int, later_stages: tuple = ()) -> Path:
        stage = {
            "steps": steps,
            "lr": 2e-3,
            "warmup_steps": 2,
            "global_batch": 4,
            "micro_batch": 1,
            "checkpoint_every": 2,
            "keep_last": keep_last,
        }
        stage1_mixture = [
            {"source": s, "task": t, "weight": 1} for s, t in (("ace", "t"), ("swig", "i"), ("mnre", "r"))
        ]
        recipe = {
            "name": name,
            "model": {
                "family": "qwen2-vl",
                "path": str(tiny_model_dir("qwen2-vl")),
                "mode": "lora",
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.1},
                "max_seq_len": 512,
            },
            "sources": {source: str(path) for source, path in demo_shards.items()},
            "stages": [
                {"name": "stage1", "mixture": stage1_mixture, **stage},
                *({**stage, **later} for later in later_stages),
            ],
            "launch": {"gpus": 2, "deepspeed_config": "zero2", "num_workers": 1},
            "logging": {"console_every": 1},
        }
        path = directory / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write
