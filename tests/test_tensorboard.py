"""TensorBoard as a user opens it (rmpl_ds.monitor): one run per stage on a global step that continues across
stages, tags that say what they measure, the custom-scalars layout, and the evaluation's scores in an ``eval`` run.
Everything is read back from the event files with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from rmpl_ds.config import recipe_from_dict
from rmpl_ds.monitor import LAYOUT, Monitor

STREAMS = ("ace:t", "swig:i")


def metrics(step: int, *, skipped: bool = False) -> dict:
    return {
        "step": step,
        "loss": 5.0 - 0.1 * step,
        "loss_by_stream": {"ace:t": 5.1 - 0.1 * step, "swig:i": 4.9 - 0.1 * step},
        "stream_counts": {"ace:t": 2, "swig:i": 2},
        "realized_share": {"ace:t": 0.5, "swig:i": 0.5},
        "epochs": {"ace:t": 0.01 * step, "swig:i": 0.02 * step},
        "lr": 1e-4,
        "grad_norm": 1.5,
        "samples_per_s": 10.0,
        "tokens_per_s": 3000.0,
        "real_token_fraction": 0.85,
        "step_time_s": 0.4,
        "peak_memory_gib": 1.25,
        "skipped": skipped,
        "bad_steps": int(skipped),
        "bad_steps_in_a_row": int(skipped),
        "elapsed_s": 0.4 * step,
    }


def recipe_of_stages(**steps: int):
    """A recipe whose stages, in order, have these names and step counts."""
    return recipe_from_dict(
        {
            "name": "r",
            "model": {"family": "qwen2-vl", "path": "m"},
            "sources": {"ace": "a"},
            "stages": [
                {"name": name, "mixture": [{"source": "ace", "task": "t", "weight": 1}], "steps": count, "lr": 1e-4}
                for name, count in steps.items()
            ],
        }
    )


def read(directory: Path) -> EventAccumulator:
    events = EventAccumulator(str(directory))
    events.Reload()
    return events


def write_stage(directory: Path, *, steps: int, offset: int, device_type: str = "cpu") -> None:
    monitor = Monitor(
        directory.parent / "stage-out",
        total_steps=steps,
        start_step=0,
        tensorboard_dir=directory,
        console_every=100,
        step_offset=offset,
        device_type=device_type,
    )
    for step in range(1, steps + 1):
        monitor.log_step(metrics(step))
    monitor.close()


def test_tags_say_what_they_measure_and_group_by_kind(tmp_path: Path) -> None:
    write_stage(tmp_path / "tensorboard" / "stage1", steps=3, offset=0)
    tags = set(read(tmp_path / "tensorboard" / "stage1").Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss_by_stream/ace:t",
        "train/loss_by_stream/swig:i",
        "train/lr",
        "train/grad_norm",
        "throughput/samples_per_s",
        "throughput/tokens_per_s",
        "throughput/step_time_s",
        "data/realized_share/ace:t",
        "data/realized_share/swig:i",
        "data/epochs/ace:t",
        "data/epochs/swig:i",
        "data/real_token_fraction",
        "memory/peak_rss_gib",  # on CPU ranks the peak resident set, not an allocator's peak
        "health/bad_steps",
        "health/bad_steps_in_a_row",
        "health/skipped",
    } == tags  # per-step stream counts and the wall clock are in metrics.jsonl, not here
    write_stage(tmp_path / "gpu", steps=1, offset=0, device_type="cuda")
    assert "memory/peak_allocated_gib" in read(tmp_path / "gpu").Tags()["scalars"]


def test_stages_continue_one_step_axis(tmp_path: Path) -> None:
    write_stage(tmp_path / "tensorboard" / "stage1", steps=3, offset=0)
    write_stage(tmp_path / "tensorboard" / "stage2", steps=2, offset=3)
    assert [e.step for e in read(tmp_path / "tensorboard" / "stage1").Scalars("train/loss")] == [1, 2, 3]
    stage2 = read(tmp_path / "tensorboard" / "stage2").Scalars("train/loss")
    assert [e.step for e in stage2] == [4, 5]
    assert stage2[0].value == pytest.approx(metrics(1)["loss"])


def test_the_step_offset_is_the_earlier_stages_steps() -> None:
    from rmpl_ds.train import StageRun

    recipe = recipe_of_stages(warmup=60, stage1=400, stage2=800)
    offsets = [StageRun(recipe, stage, Path("run")).step_offset for stage in recipe.stages]
    assert offsets == [0, 60, 460]
    assert StageRun(recipe, recipe.stages[2], Path("run")).tensorboard_dir == Path("run/tensorboard/stage2")


def test_the_custom_scalars_layout_opens_on_loss_lr_throughput_and_memory(tmp_path: Path) -> None:
    write_stage(tmp_path / "tb", steps=1, offset=0)
    events = read(tmp_path / "tb")
    content = events.PluginTagToContent("custom_scalars")["custom_scalars__config__"]
    tensor = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor.string_val[0])
    assert content is not None
    titles = [category.title for category in layout.category]
    assert titles[:2] == ["training", "throughput and memory"] and titles == list(LAYOUT)
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["loss, total and per stream"] == [r"train/loss$", r"train/loss_by_stream/.*"]
    assert charts["peak memory (GiB)"] == [r"memory/.*"]
    assert "samples and tokens per second" in charts and "learning rate" in charts


def test_the_pipeline_logs_each_models_scores_where_its_stage_ended(tmp_path: Path, real_fixtures: Path) -> None:
    from rmpl_ds.evaluate.m2e2 import gold_as_predictions, score_m2e2
    from rmpl_ds.pipeline import log_evaluation
    from rmpl_ds.sources.m2e2 import load_m2e2

    gold = load_m2e2(real_fixtures / "m2e2", strict=True)
    score = score_m2e2(gold, gold_as_predictions(gold)).to_json()
    log_evaluation(
        tmp_path, recipe_of_stages(stage1=60, stage2=400), {"baseline": score, "stage1": score, "stage2": score}
    )
    events = read(tmp_path / "tensorboard" / "eval")
    f1 = events.Scalars("eval/m2e2/event_mention/text_only/f1")
    assert [e.step for e in f1] == [0, 60, 460]
    assert f1[0].value == pytest.approx(100.0)
