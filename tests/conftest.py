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
