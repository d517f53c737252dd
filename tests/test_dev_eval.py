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
    assert "stages[0].eval.metric: must be one of ['loss', 'loss/ace:t', 'loss/mnre:r'], got 'f1'" in message
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
    scored = BestTracker("f1/ace:EM")  # F1: higher is better
    for step, value in ((2, 10.0), (4, 30.0), (6, 20.0)):
        scored.record(step, {"eval_loss": 1.0, "eval_f1_by_stream": {"ace:EM": value}})
    assert scored.higher_is_better and scored.best == (4, 30.0)


def test_generated_answers_are_scored_strictly_per_item(demo_shards) -> None:
    from rmpl_ds import records, tasks
    from rmpl_ds.dev_eval import f1, item_counts

    with ShardSet.open(demo_shards["swig"]) as shards:
        image_item = next(
            item for item in (shards.read(i) for i in range(len(shards))) if len(item["json"]["events"]) == 1
        )
    with ShardSet.open(demo_shards["ace"]) as shards:
        sentence = next(
            records.from_json(item["json"])
            for item in (shards.read(i) for i in range(len(shards)))
            if any(event["arguments"] for event in item["json"]["events"])
        )
    image_record = records.from_json(image_item["json"])
    image_type = image_record.events[0].event_type
    em = tasks.render(image_record, "EM", image=image_item["jpg"])
    assert item_counts(em, em.target, tasks.PLAIN, 0.5) == (1, 1, 1)
    assert item_counts(em, "none", tasks.PLAIN, 0.5) == (0, 0, 1)
    other = next(t for t in tasks.EVENT_TYPES if t != image_type)
    assert item_counts(em, f"{image_type}\n{other}", tasks.PLAIN, 0.5) == (1, 2, 1)

    ar = tasks.render(image_record, "AR", image=image_item["jpg"], event_type=image_type)
    n_boxes = sum(1 for argument in image_record.events[0].arguments if argument.box is not None)
    assert n_boxes > 0 and item_counts(ar, ar.target, tasks.PLAIN, 0.5) == (n_boxes, n_boxes, n_boxes)
    first_box = ar.target.split(";")[0].split(":", 1)[1]
    moved = ar.target.replace(first_box.strip(), "[0,0,1,1]", 1)  # far from every gold box
    assert item_counts(ar, moved, tasks.PLAIN, 0.5) == (n_boxes - 1, n_boxes, n_boxes)
    assert item_counts(ar, "", tasks.PLAIN, 0.5) == (0, 0, n_boxes)

    event = next(event for event in sentence.events if event.arguments)
    text_ar = tasks.render(sentence, "AR", event_type=event.event_type)
    gold = tasks.parse("AR", text_ar.target, example_meta=text_ar.meta)
    n_arguments = sum(len(e.arguments) for e in gold.events)
    assert item_counts(text_ar, text_ar.target, tasks.PLAIN, 0.5) == (n_arguments, n_arguments, n_arguments)
    assert f1(0, 0, 0) == 100.0 and f1(1, 2, 2) == 50.0 and f1(0, 3, 0) == 0.0


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


@pytest.mark.slow
def test_generation_f1_of_em_and_ar_streams_on_two_ranks(launcher_recipe, tmp_path: Path) -> None:
    """A Stage II mixture (ace:EM, swig:AR) with eval.generate: F1 per stream and per task in metrics.jsonl and
    TensorBoard, the best step by F1 exported, and training losses equal to the run without eval."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = launcher_recipe(tmp_path, "dev-eval-f1", steps=4, keep_last=1)
    data = yaml.safe_load(path.read_text())
    mixture = [{"source": "ace", "task": "EM", "weight": 1}, {"source": "swig", "task": "AR", "weight": 1}]
    data["stages"][0].update(train_splits=["train"], mixture=mixture)
    path.write_text(yaml.safe_dump(data))
    setup = {"recipe": path}
    evaluation = {"every": 2, "max_items": 4, "generate": True, "max_new_tokens": 12, "keep_best": True, "metric": "f1"}
    with_eval, without = tmp_path / "with", tmp_path / "without"
    train(setup, with_eval, "stage1", "stages.stage1.eval=" + json.dumps(evaluation))
    train(setup, without)
    assert [m["loss"] for m in metric_lines(with_eval)] == [m["loss"] for m in metric_lines(without)]
    evaluated = eval_lines(with_eval)
    assert [m["step"] for m in evaluated] == [2, 4]
    for line in evaluated:
        assert set(line["eval_f1_by_stream"]) == {"ace:EM", "swig:AR"}
        assert set(line["eval_f1_by_task"]) == {"EM", "AR"}
        assert all(0.0 <= value <= 100.0 for value in line["eval_f1_by_stream"].values())
        assert line["eval_f1"] == pytest.approx(sum(line["eval_f1_by_stream"].values()) / 2, rel=1e-12)
    best = max(evaluated, key=lambda m: (m["eval_f1"], -m["step"]))
    manifest = json.loads((with_eval / "stage1" / "export" / handoff.MANIFEST).read_text())
    assert manifest["selected"]["step"] == best["step"] and manifest["selected"]["metric"] == "eval f1"
    assert manifest["selected"]["why"].startswith("the highest eval f1 of 2 evaluations")
    accumulator = EventAccumulator(str(with_eval / "tensorboard" / "stage1"))
    accumulator.Reload()
    assert {"eval/f1", "eval/f1/ace:EM", "eval/f1/swig:AR", "eval/EM/f1", "eval/AR/f1"} <= set(
        accumulator.Tags()["scalars"]
    )
    # QLoRA (4-bit base, bf16 compute) under ZeRO-2: the same evaluation runs on both ranks and the stage ends.
    quantized = tmp_path / "qlora"
    train(
        setup, quantized, "stage1", "stages.stage1.eval=" + json.dumps(evaluation), "model.mode=qlora",
        "stages.stage1.steps=2",
    )  # fmt: skip
    (line,) = eval_lines(quantized)
    assert line["step"] == 2 and set(line["eval_f1_by_task"]) == {"EM", "AR"} and math.isfinite(line["eval_loss"])
