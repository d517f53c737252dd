"""The pipeline's report cannot be mistaken: it says what the run is (the demo: synthetic data, a tiny model), why
a row reads 0, which F1 is micro and which macro, and its mixture panel tells the streams apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rmpl_ds.config import load_recipe
from rmpl_ds.evaluate.curves import _mixture_deviation
from rmpl_ds.evaluate.m2e2 import gold_as_predictions, score_m2e2
from rmpl_ds.evaluate.report import render_markdown
from rmpl_ds.pipeline import row_notes
from rmpl_ds.sources.m2e2 import load_m2e2

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "launch" / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def scores(real_fixtures: Path) -> dict[str, Any]:
    gold = load_m2e2(real_fixtures / "m2e2", strict=True)
    return score_m2e2(gold, gold_as_predictions(gold)).to_json()


def test_the_demo_report_says_it_is_synthetic_data_on_a_tiny_model(scores: dict[str, Any]) -> None:
    demo = load_recipe(DEMO)
    text = render_markdown(
        {"baseline": scores, "stage1": scores, "stage2": scores},
        preamble=demo.description or "",
        row_notes=row_notes(demo),
    )
    head = text.split("## Table 2")[0]
    assert "SYNTHETIC data" in head and "TINY random-initialized model" in head
    assert "say nothing about how RMPL performs on the real M2E2 benchmark" in head.replace("\n> ", " ")


def test_rows_that_read_zero_say_why(scores: dict[str, Any]) -> None:
    demo = load_recipe(DEMO)
    notes = row_notes(demo)
    assert set(notes) == {"baseline", "stage1"}  # stage2 trains EM and AR: its scores need no excuse
    assert "zero-shot" in notes["baseline"]
    assert "trained on i, r, t only, never on the EM/AR prompts" in notes["stage1"]
    text = render_markdown({"baseline": scores, "stage1": scores, "stage2": scores}, row_notes=notes)
    rows = [line for line in text.splitlines() if line.startswith(("| baseline", "| stage1", "| stage2"))]
    assert [row.split(" | ")[0] for row in rows[:3]] == ["| baseline *", "| stage1 **", "| stage2"]
    assert "* baseline: the base model" in text and "** stage1: trained on" in text


def test_metrics_are_named_micro_or_macro(scores: dict[str, Any]) -> None:
    text = render_markdown({"model": scores})
    assert "## Table 2 (micro-averaged)" in text and "Micro-averaged P / R / F1" in text
    assert "## Event mention macro-F1 (the mean of per-type F1; the paper's event-mention metric)" in text


def test_the_mixture_panel_separates_streams_by_their_deviation() -> None:
    """Realized minus target samples per stream: exact ratios keep every stream within a sample of its target."""
    demo = load_recipe(DEMO)
    stage = demo.stage("stage1")  # 1:1:1 at global batch 16
    metrics = []
    drawn = {"ace:t": 0, "swig:i": 0, "mnre:r": 0}
    period = ["ace:t", "swig:i", "mnre:r"]
    for step in range(1, 7):
        for slot in range((step - 1) * 16, step * 16):
            drawn[period[slot % 3]] += 1
        total = step * 16
        metrics.append({"step": step, "realized_share": {name: count / total for name, count in drawn.items()}})
    deviation = _mixture_deviation(metrics, stage)
    assert set(deviation) == {"ace:t", "swig:i", "mnre:r"}
    assert all(abs(value) <= 1.0 for values in deviation.values() for value in values)
    # 16 slots of a period of 3 (6, 5, 5 draws for a target of 5.33 each): ace:t two thirds of a sample ahead
    assert deviation["ace:t"][0] == pytest.approx(2 / 3) and deviation["mnre:r"][0] == pytest.approx(-1 / 3)
