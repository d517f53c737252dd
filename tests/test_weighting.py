"""Dynamic weight averaging (rmpl_ds.weighting): the formula against hand-computed values, the windows, the state.

The loop's use of it (weights applied per sample, logged, restored bitwise on resume under 2 ranks) is tested in
tests/test_train.py, whose Stage I trains with DWA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rmpl_ds.config import LossWeightingConfig
from rmpl_ds.weighting import StreamWeights, dwa_weights

NAMES = ("ace:t", "swig:i", "mnre:r")
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo.yaml"


def test_dwa_formula_against_hand_computed_values() -> None:
    # r = 0.5 x (1/2, 2/2) = (0.25, 0.5); 2 x softmax = 2 / (1 + e^0.25) = 0.875647, 2 / (1 + e^-0.25) = 1.124353
    assert dwa_weights([1.0, 2.0], [2.0, 2.0], 0.5) == pytest.approx([0.8756469982, 1.1243530018], abs=1e-10)
    # The original DWA's T = 2 is alpha = 0.5; here alpha = 2: r = 2 x (0.9, 1.2, 0.5) = (1.8, 2.4, 1.0),
    # 3 x (e^1.8, e^2.4, e^1.0) / (6.0496 + 11.0232 + 2.7183) = (0.917025, 1.670929, 0.412046)
    weights = dwa_weights([0.9, 1.2, 0.3], [1.0, 1.0, 0.6], 2.0)
    assert weights == pytest.approx([0.9170251876, 1.6709288348, 0.4120459776], abs=1e-10)
    assert sum(weights) == pytest.approx(3.0)
    # Equal ratios: every weight is 1, whatever the losses.
    assert dwa_weights([3.0, 0.3], [6.0, 0.6], 0.5) == pytest.approx([1.0, 1.0])
    # A stream whose loss stopped falling gets more weight than one still falling fast.
    slow, fast = dwa_weights([0.99, 0.5], [1.0, 1.0], 0.5)
    assert slow > 1 > fast


def weights(window: int = 2, base: tuple[float, ...] = (1.0, 1.0, 0.5)) -> StreamWeights:
    return StreamWeights.build(LossWeightingConfig(kind="dwa", temperature=0.5, window=window), NAMES, base)


def test_weights_are_one_until_two_windows_then_change_when_a_window_closes() -> None:
    dwa = weights(window=2)
    counts = {"ace:t": 2, "swig:i": 1, "mnre:r": 1}
    # window 1 (steps 1-2) and window 2 (steps 3-4); mnre:r's mean is the sample-weighted mean of its steps
    steps = [
        {"ace:t": 4.0, "swig:i": 2.0, "mnre:r": 1.0},
        {"ace:t": 2.0, "swig:i": 2.0, "mnre:r": 3.0},
        {"ace:t": 1.0, "swig:i": 2.0, "mnre:r": 1.0},
        {"ace:t": 2.0, "swig:i": 2.0, "mnre:r": 1.0},
    ]
    changed = [dwa.observe(step, losses, counts) for step, losses in enumerate(steps, start=1)]
    assert changed == [False, False, False, True]
    # means: ace 3 -> 1.5, swig 2 -> 2, mnre 2 -> 1: ratios (0.5, 1, 0.5)
    expected = dwa_weights([1.5, 2.0, 1.0], [3.0, 2.0, 2.0], 0.5)
    assert dwa.factors == pytest.approx(expected)
    assert dwa.weights == pytest.approx({"ace:t": expected[0], "swig:i": expected[1], "mnre:r": 0.5 * expected[2]})
    assert dwa.factors[1] > dwa.factors[0] == pytest.approx(dwa.factors[2])  # swig's loss did not fall


def test_a_stream_without_samples_keeps_its_mean_and_non_finite_losses_are_left_out() -> None:
    dwa = weights(window=1)
    dwa.observe(1, {"ace:t": 2.0, "swig:i": 2.0, "mnre:r": 2.0}, dict.fromkeys(NAMES, 1))
    dwa.observe(2, {"ace:t": 1.0, "swig:i": math.nan}, {"ace:t": 1, "swig:i": 1, "mnre:r": 0})
    # swig's NaN and mnre's empty window count nothing: their means stay 2 -> ratio 1 for both
    assert dwa.factors == pytest.approx(dwa_weights([1.0, 2.0, 2.0], [2.0, 2.0, 2.0], 0.5))


def test_fixed_weights_never_move() -> None:
    fixed = StreamWeights.build(LossWeightingConfig(), NAMES, (1.0, 1.0, 0.5))
    assert not fixed.dynamic
    for step in range(1, 50):
        assert not fixed.observe(step, {"ace:t": 10.0 / step}, {"ace:t": 1})
    assert fixed.weights == {"ace:t": 1.0, "swig:i": 1.0, "mnre:r": 0.5}


def test_state_through_a_checkpoint_gives_the_same_weights_bitwise() -> None:
    trace = [
        ({"ace:t": 3.0 / s, "swig:i": 2.0 + 0.1 * s, "mnre:r": 1.0 + 1 / (s + 1)}, s % 3 + 1) for s in range(1, 13)
    ]

    def feed(dwa: StreamWeights, steps: range) -> list[list[float]]:
        seen = []
        for step in steps:
            losses, count = trace[step - 1]
            dwa.observe(step, losses, dict.fromkeys(NAMES, count))
            seen.append(list(dwa.factors))
        return seen

    uninterrupted = feed(weights(window=3), range(1, 13))
    first = weights(window=3)
    before = feed(first, range(1, 8))  # stopped mid-window (step 7 of the window 7-9)
    saved = json.loads(json.dumps(first.state()))  # what a checkpoint keeps, through a serialization
    resumed = weights(window=3).restored(saved)
    after = feed(resumed, range(8, 13))
    assert before + after == uninterrupted  # bitwise, not approximately
    assert len({tuple(f) for f in uninterrupted}) > 2  # the weights did move
    # Without the state the windows start over and the weights differ.
    assert feed(weights(window=3), range(8, 13)) != after
    # Another mixture (a new phase with other streams) starts over instead of misassigning weights.
    other = StreamWeights.build(LossWeightingConfig(kind="dwa"), ("ace:t", "swig:i"), (1.0, 1.0)).restored(saved)
    assert other.factors == [1.0, 1.0]


def test_recipe_validation_of_loss_weighting() -> None:
    from rmpl_ds.config import ConfigError, load_recipe

    recipe = load_recipe(DEMO_RECIPE, ["stages.stage2.loss_weighting={kind: dwa, window: 10}"])
    assert recipe.stage("stage2").loss_weighting == LossWeightingConfig(kind="dwa", temperature=0.5, window=10)
    with pytest.raises(ConfigError) as error:
        load_recipe(
            DEMO_RECIPE,
            [
                "stages.stage2.loss_weighting={kind: dwa, window: 0, temperature: -1}",
                "stages.stage1.loss_weighting.kind=x",
            ],
        )
    message = str(error.value)
    assert "stages[1].loss_weighting.window: must be > 0, got 0" in message
    assert "stages[1].loss_weighting.temperature: must be > 0, got -1" in message
    assert "stages[0].loss_weighting.kind: must be one of fixed, dwa; got 'x'" in message


def test_the_new_options_at_their_defaults_keep_the_fingerprints_of_older_checkpoints_and_exports() -> None:
    """A checkpoint or export made before loss_weighting and tasks.schema_guided existed still resumes and hands
    off: at their defaults they are left out of the stage and lineage fingerprints (the shape older code hashed);
    set, they change both."""
    from rmpl_ds.config import fingerprint, load_recipe, to_dict
    from rmpl_ds.handoff import lineage_fingerprint
    from rmpl_ds.train import ELASTIC_KEYS, stage_fingerprint

    recipe = load_recipe(DEMO_RECIPE)
    older_stages = [{k: v for k, v in to_dict(stage).items() if k != "loss_weighting"} for stage in recipe.stages]
    older_tasks = {k: v for k, v in to_dict(recipe.tasks).items() if k != "schema_guided"}
    older = {"model": recipe.model, "sources": recipe.sources, "tasks": older_tasks, "stages": older_stages}
    assert lineage_fingerprint(recipe, "stage2") == fingerprint(older)
    stage1 = {k: v for k, v in older_stages[0].items() if k not in ELASTIC_KEYS}
    assert stage_fingerprint(recipe.stage("stage1")) == fingerprint(stage1)  # stage1 trains on [train]
    for override in ("stages.stage2.loss_weighting.kind=dwa", "tasks.schema_guided=true"):
        changed = load_recipe(DEMO_RECIPE, [override])
        assert lineage_fingerprint(changed, "stage2") != lineage_fingerprint(recipe, "stage2"), override
    dwa = load_recipe(DEMO_RECIPE, ["stages.stage2.loss_weighting.kind=dwa"])
    assert stage_fingerprint(dwa.stage("stage2")) != stage_fingerprint(recipe.stage("stage2"))
