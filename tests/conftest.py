"""Shared pytest fixtures. Each section says who uses it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

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
# Launcher tests (test_train.py, test_reliability.py): shard sets of a small demo set, built once per session with
# the real converters and read-only afterwards.


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
