"""Evaluation during training (rmpl_ds.dev_eval): held-out records by split, per-stream eval loss on every rank,
the best checkpoint kept out of the rotation and exported, and the training left untouched.

The launcher tests run the real `rmpl-ds train` on 2 gloo CPU ranks (the tiny Qwen2-VL with LoRA, the demo shards of
conftest: ACE and SWiG keep their `dev` split, MNRE its `val`), Stage I trained on `train` records only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from test_train import metric_lines, train

from rmpl_ds import checkpoint, handoff
from rmpl_ds.config import recipe_from_dict
from rmpl_ds.dev_eval import BestTracker
from rmpl_ds.errors import ConfigError, UserError
from rmpl_ds.shards import ShardSet, read_manifest

# ------------------------------------------------------------------------------------------- fast: the pieces


def test_a_shard_set_splits_by_its_records_and_a_view_reads_like_a_set(demo_shards) -> None:
    with ShardSet.open(demo_shards["ace"]) as shards:
        by_split = shards.splits()
        assert {split: len(found) for split, found in by_split.items()} == read_manifest(demo_shards["ace"])["counts"][
            "by_split"
        ]
        view = shards.subset(["dev"])
        assert len(view) == len(by_split["dev"]) > 0
        for i in range(len(view)):
            assert view.key(i) == shards.key(by_split["dev"][i])
            assert json.loads(view.read_raw(i)["json"])["split"] == "dev"
        assert view.read(-1)["json"]["split"] == "dev"
        with pytest.raises(IndexError):
            view.key(len(view))
        # Another selection of the same set is another data set: a sampler state saved on one is refused on the other.
        assert len({shards.fingerprint(), view.fingerprint(), shards.subset(["train"]).fingerprint()}) == 3
        with pytest.raises(UserError, match=r"no sample of split\(s\) \['val'\] \(it holds dev 6, test 6, train 28\)"):
            shards.subset(["val"])


def recipe(stage: dict) -> dict:
    return {
        "name": "m",
        "model": {"family": "qwen2-vl", "path": "x"},
        "sources": {"ace": "a", "swig": "s"},
        "stages": [
            {
                "name": "stage1",
                "mixture": [{"source": "ace", "task": "t", "weight": 1}, {"source": "swig", "task": "i", "weight": 1}],
                "steps": 10,
                "lr": 1e-3,
                "checkpoint_every": 5,
                **stage,
            }
        ],
        "launch": {"gpus": 1},
    }


def test_the_eval_section_is_checked_with_the_recipe() -> None:
    good = recipe_from_dict(recipe({"train_splits": ["train"], "eval": {"every": 5, "keep_best": True}}))
    assert good.stages[0].eval.splits == ("dev", "val") and good.stages[0].eval.metric == "loss"
    with pytest.raises(ConfigError) as raised:
        recipe_from_dict(recipe({"eval": {"every": 5}}))
    assert "stages[0].train_splits: is empty, so the stage trains on every record" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        recipe_from_dict(
            recipe(
                {
                    "train_splits": ["train", "dev"],
                    "eval": {"every": 3, "keep_best": True, "streams": ["ace:t", "mnre:r"], "metric": "f1"},
                }
            )
        )
    message = str(raised.value)
    assert "stages[0].eval.splits: ['dev'] are trained on too (train_splits)" in message
    assert "stages[0].eval.streams: 'mnre:r' is not a stream of this stage" in message
    assert "stages[0].eval.metric: must be loss or loss/<stream>" in message
    assert "stages[0].eval.every: keep_best keeps an evaluated step's checkpoint: every (3) must be" in message


def test_best_tracker_keeps_the_lowest_and_trims_to_a_resumed_step() -> None:
    tracker = BestTracker("loss")
    assert tracker.record(2, {"eval_loss": 3.0}) and tracker.best == (2, 3.0)
    assert tracker.record(4, {"eval_loss": 2.0}) and tracker.best == (4, 2.0)
    assert not tracker.record(6, {"eval_loss": 2.5}) and tracker.best == (4, 2.0)
    assert not tracker.record(8, {"eval_loss": 2.0}) and tracker.best == (4, 2.0)  # a tie keeps the earlier step
    assert not tracker.record(10, {"eval_loss": math.nan}) and tracker.best == (4, 2.0)
    resumed = BestTracker.from_state("loss", tracker.state(), step=6)  # a checkpoint of step 6 knows steps 2-6
    assert resumed.history == [[2, 3.0], [4, 2.0], [6, 2.5]]
    assert BestTracker.from_state("loss/ace:t", tracker.state(), step=6).history == []  # another metric: start over
    per_stream = BestTracker("loss/ace:t")
    per_stream.record(2, {"eval_loss": 1.0, "eval_loss_by_stream": {"ace:t": 5.0}})
    assert per_stream.best == (2, 5.0)


def test_the_rotation_keeps_the_protected_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        (root / checkpoint.tag_for(step) / checkpoint.MARKER).write_text("{}")
    checkpoint._prune(root, 1, current=checkpoint.tag_for(8), protect=checkpoint.tag_for(4))
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.tag_for(4), checkpoint.tag_for(8)]


# ------------------------------------------------------------------------------------------ slow: the launcher

STEPS = 6
# The best by MNRE's held-out loss: on these runs it falls, then rises (7.70, 7.25, 7.33), while the mean falls.
EVAL = {"every": 2, "max_items": 5, "keep_best": True, "metric": "loss/mnre:r"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, launcher_recipe) -> dict:
    """The same Stage I (train records only, keep_last 1, lr 2e-2) with eval off and on, and with eval on stopped
    after step 4 and resumed."""
    base = tmp_path_factory.mktemp("dev-eval")
    path = launcher_recipe(base, "dev-eval", steps=STEPS, keep_last=1)
    data = yaml.safe_load(path.read_text())
    data["stages"][0].update(train_splits=["train"], lr=2e-2)
    path.write_text(yaml.safe_dump(data))
    setup = {"recipe": path}
    off, on, resumed = base / "off", base / "on", base / "resumed"
    eval_override = "stages.stage1.eval=" + json.dumps(EVAL)
    train(setup, off)
    train(setup, on, "stage1", eval_override)
    train(setup, resumed, "stage1", eval_override, "--stop-after", "4")
    train(setup, resumed, "stage1", eval_override)
    return {"setup": setup, "off": off, "on": on, "resumed": resumed, "override": eval_override}


def eval_lines(out: Path) -> list[dict]:
    return [line for line in metric_lines(out) if "eval_loss" in line]


@pytest.mark.slow
def test_eval_leaves_training_untouched_and_logs_every_stream(runs: dict) -> None:
    off, on = metric_lines(runs["off"]), metric_lines(runs["on"])
    assert [m["step"] for m in on] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in on] == [m["loss"] for m in off]  # bit for bit: eval draws nothing, moves nothing
    assert [m["loss_by_stream"] for m in on] == [m["loss_by_stream"] for m in off]
    assert all("eval_loss" not in m for m in off)
    evaluated = eval_lines(runs["on"])
    assert [m["step"] for m in evaluated] == [2, 4, 6]
    for line in evaluated:
        assert set(line["eval_loss_by_stream"]) == {"ace:t", "swig:i", "mnre:r"}
        assert line["eval_items"] == 15  # 5 held-out records per stream
        assert line["eval_loss"] == pytest.approx(sum(line["eval_loss_by_stream"].values()) / 3, rel=1e-12)


@pytest.mark.slow
def test_the_best_checkpoint_survives_the_rotation_and_is_exported(runs: dict) -> None:
    evaluated = eval_lines(runs["on"])
    best = min(evaluated, key=lambda m: (m["eval_loss_by_stream"]["mnre:r"], m["step"]))
    assert best["step"] != STEPS, "the held-out loss must turn for this test to prove the rotation keeps the best"
    kept = sorted(p.name for p in (runs["on"] / "stage1" / "checkpoints").iterdir() if p.is_dir())
    assert kept == [checkpoint.tag_for(best["step"]), checkpoint.tag_for(STEPS)]  # keep_last 1 + the best
    manifest = json.loads((runs["on"] / "stage1" / "export" / handoff.MANIFEST).read_text())
    assert manifest["step"] == best["step"]
    assert manifest["selected"]["step"] == best["step"]
    assert manifest["selected"]["value"] == best["eval_loss_by_stream"]["mnre:r"]
    assert manifest["selected"]["metric"] == "eval loss/mnre:r"
    assert manifest["selected"]["history"] == [[m["step"], m["eval_loss_by_stream"]["mnre:r"]] for m in evaluated]
    summary = json.loads((runs["on"] / "stage1" / "summary.json").read_text())
    assert summary["export_step"] == best["step"] and summary["steps"] == STEPS


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_so_far(runs: dict) -> None:
    on, resumed = eval_lines(runs["on"]), eval_lines(runs["resumed"])
    assert [m["step"] for m in resumed] == [2, 4, 6]
    assert [(m["eval_loss"], m["eval_loss_by_stream"]) for m in resumed] == [
        (m["eval_loss"], m["eval_loss_by_stream"]) for m in on
    ]
    manifests = [json.loads((runs[r] / "stage1" / "export" / handoff.MANIFEST).read_text()) for r in ("on", "resumed")]
    assert manifests[0]["selected"] == manifests[1]["selected"]
    assert manifests[0]["weights_digest"] == manifests[1]["weights_digest"]


@pytest.mark.slow
def test_one_rank_gives_the_eval_numbers_of_two(runs: dict, tmp_path: Path) -> None:
    """With an lr too small to move the weights, the eval numbers depend only on the items: 1 and 2 ranks agree to
    fp32 rounding (the items fall into other micro-batches, so padding differs)."""
    still = ["stages.stage1.lr=1.0e-12", "stages.stage1.warmup_steps=0", "stages.stage1.steps=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(runs["setup"], two, "stage1", runs["override"], *still)
    train(runs["setup"], one, "stage1", runs["override"], *still, "launch.gpus=1")
    (a,), (b,) = eval_lines(one), eval_lines(two)
    assert a["eval_items"] == b["eval_items"] == 15
    for name, value in b["eval_loss_by_stream"].items():
        assert a["eval_loss_by_stream"][name] == pytest.approx(value, rel=1e-5)


@pytest.mark.slow
def test_eval_tags_read_back_from_tensorboard(runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(runs["on"] / "tensorboard" / "stage1"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"eval/loss", "eval/loss/ace:t", "eval/loss/swig:i", "eval/loss/mnre:r", "eval/time_s"} <= tags
    logged = [(event.step, event.value) for event in accumulator.Scalars("eval/loss")]
    assert [step for step, _ in logged] == [2, 4, 6]
    assert [value for _, value in logged] == pytest.approx([m["eval_loss"] for m in eval_lines(runs["on"])], rel=1e-6)
