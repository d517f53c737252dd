"""`rmpl-ds eval`: a tiny Qwen2-VL on the demo M2E2 set end to end, 1 vs 2 ranks, and the pure parts (lines from
parsed structures, box mapping to original pixels, the multimedia pairing rule, which items run)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rmpl_ds.cli import main
from rmpl_ds.errors import UserError
from rmpl_ds.evaluate.infer import (
    EVAL_SETTINGS,
    PARTS_DIR,
    finish_predictions,
    image_events,
    model_name,
    pair_multimedia,
    plan_items,
    text_events,
)
from rmpl_ds.evaluate.m2e2 import (
    BoxArgumentPrediction,
    ImageEventPrediction,
    MultimediaEventPrediction,
    Predictions,
    TextArgumentPrediction,
    TextEventPrediction,
    read_predictions,
    score_m2e2,
)
from rmpl_ds.evaluate.report import check_scores
from rmpl_ds.images import load_image
from rmpl_ds.records import ImageRecord
from rmpl_ds.sources.demo import write_demo
from rmpl_ds.sources.m2e2 import M2E2Gold, load_m2e2
from rmpl_ds.tasks import Parsed, ParsedArgument, ParsedEvent, parse, render, to_structure

OUTPUTS = ["eval_stats.json", "f1.png", "predictions.jsonl", "report.md", "scores.json"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo M2E2 split (2 documents, 14 sentences, 4 annotated images + 1 unannotated)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, seed=0, size=20)
    return root / "m2e2"


@pytest.fixture(scope="module")
def gold(demo: Path) -> M2E2Gold:
    return load_m2e2(demo, images_dir=demo / "image", strict=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the CPU is shared, and two threads fighting other jobs for 2 cores are ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eval_args(model: Path, demo: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval", "--model", str(model), "--m2e2", str(demo), "--images", str(demo / "image"), "--out", str(out),
        "--max-new-tokens", "24", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# End to end with a tiny model


def test_eval_runs_end_to_end_on_the_demo_set(
    tiny_model_dir: Callable[[str], Path],
    demo: Path,
    gold: M2E2Gold,
    tmp_path: Path,
    one_thread: None,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "eval"
    code = main(eval_args(tiny_model_dir("qwen2-vl"), demo, out, "--limit", "6", "--name", "base", "--json"))
    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == OUTPUTS  # no parts, no .partial files
    # In a fresh process the library notices go to stderr (the command redirects them); here DeepSpeed was imported
    # earlier in the session with its handler bound to the captured stdout, so read the object that ends stdout.
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.index("{\n") :])
    scores = json.loads((out / "scores.json").read_text())
    assert printed == scores
    check_scores("base", scores)  # the `rmpl-ds score --json` shape
    # --limit 6: the first 6 sentences and all 5 images (4 annotated), scored against their gold only.
    assert scores["gold_counts"]["text_events"] == sum(len(s.events) for s in gold.sentences[:6])
    assert scores["gold_counts"]["image_events"] == 4
    predictions = read_predictions(out / "predictions.jsonl")
    assert scores["predictions"]["text_events"] == len(predictions.text)
    stats = json.loads((out / "eval_stats.json").read_text())
    assert stats["plan"] == {"sentences": 6, "images": 5}
    assert stats["generations"]["EM/text"] == 6 and stats["generations"]["EM/image"] == 5
    # A random model's answers are malformed, and that is counted, not fatal.
    assert stats["malformed_outputs"]["EM/text"] + stats["malformed_outputs"]["EM/image"] > 0
    report = (out / "report.md").read_text()
    assert "| base |" in report and "the first 6 of each" in report
    assert (out / "f1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_one_and_two_ranks_write_identical_predictions(
    tiny_model_dir: Callable[[str], Path], demo: Path, tmp_path: Path, one_thread: None
) -> None:
    # --oracle-types asks AR for the gold types, so a random model still produces text, image and multimedia lines
    # (its EM answers never name a type): the comparison covers EM-free AR generation, parsing and pairing.
    model = tiny_model_dir("qwen2-vl")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(eval_args(model, demo, one, "--oracle-types", "--batch-size", "3")) == 0
    assert main(eval_args(model, demo, two, "--oracle-types", "--batch-size", "3", "--gpus", "2")) == 0
    assert (one / "predictions.jsonl").read_bytes() == (two / "predictions.jsonl").read_bytes()
    assert json.loads((one / "scores.json").read_text()) == json.loads((two / "scores.json").read_text())
    assert not (two / PARTS_DIR).exists()
    predictions = read_predictions(one / "predictions.jsonl")
    assert predictions.text and predictions.image and predictions.multimedia
    stats_one = json.loads((one / "eval_stats.json").read_text())
    stats_two = json.loads((two / "eval_stats.json").read_text())
    assert stats_one["generations"] == stats_two["generations"] == {"AR/image": 4, "AR/text": 11}
    assert len(stats_two["seconds"]) == 2  # one entry per rank


def test_a_lora_adapter_export_is_evaluated_on_its_base(
    tiny_model_dir: Callable[[str], Path], demo: Path, tmp_path: Path, one_thread: None
) -> None:
    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.evaluate.infer import evaluate_model

    base = tiny_model_dir("qwen2-vl")
    adapter = get_adapter("qwen2-vl")
    model, bundle = adapter.load(base, "lora", gradient_checkpointing=False)
    exported = adapter.export_adapter(model, tmp_path / "stage2" / "export", bundle)
    scores = evaluate_model(exported, demo, demo / "image", tmp_path / "eval", limit=2, max_new_tokens=8)
    check_scores("stage2", scores)
    stats = json.loads((tmp_path / "eval" / "eval_stats.json").read_text())
    assert stats["name"] == "stage2"  # <stage>/export is named after the stage
    assert Path(stats["adapter"]) == exported.resolve() and Path(stats["weights"]) == base.resolve()


def test_predict_m2e2_in_process_asks_ar_for_each_type(
    tiny_model_dir: Callable[[str], Path], demo: Path, gold: M2E2Gold, one_thread: None
) -> None:
    from rmpl_ds.evaluate.infer import load_for_inference, predict_m2e2, resolve_model

    model, bundle = load_for_inference(resolve_model(tiny_model_dir("qwen2-vl")), "cpu")
    predictions, stats = predict_m2e2(
        model, bundle, gold, images_dir=demo / "image", limit=3, max_new_tokens=8, oracle_types=True
    )
    wanted = {(s.id, event.event_type) for s in gold.sentences[:3] for event in s.events}
    assert {(line.sentence_id, line.event_type) for line in predictions.text} == wanted
    assert stats.generations["AR/text"] == len(wanted) and "EM/text" not in stats.generations
    assert stats.items == {"text": 3, "image": 3}


def test_an_export_trained_with_schema_guided_prompts_is_evaluated_with_them(
    tiny_model_dir: Callable[[str], Path], demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's manifest says how its prompts were written (tasks.schema_guided); evaluation asks the same way
    unless told otherwise (`rmpl-ds eval --no-schema-guided`)."""
    from rmpl_ds import tasks
    from rmpl_ds.evaluate.infer import evaluate_model, resolve_model
    from rmpl_ds.ontology import DEFINITIONS

    export = tmp_path / "stage2" / "export"
    export.mkdir(parents=True)
    for item in tiny_model_dir("qwen2-vl").iterdir():
        (export / item.name).symlink_to(item)
    (export / "rmpl_export.json").write_text(json.dumps({"box_format": "native", "schema_guided": True}))
    assert resolve_model(export).schema_guided is True
    systems: list[str] = []
    render = tasks.render

    def recording(*args, **kwargs):
        example = render(*args, **kwargs)
        systems.append(example.system)
        return example

    monkeypatch.setattr(tasks, "render", recording)
    for override, guided in ((None, True), (False, False)):
        systems.clear()
        evaluate_model(export, demo, demo / "image", tmp_path / f"eval-{override}", limit=1, max_new_tokens=4,
                       schema_guided=override)  # fmt: skip
        stats = json.loads((tmp_path / f"eval-{override}" / "eval_stats.json").read_text())
        assert stats["schema_guided"] is guided and systems
        assert all((DEFINITIONS["Life:Die"] in system) is guided for system in systems), systems[0]


def test_a_failing_worker_stops_the_others() -> None:
    import subprocess
    import sys
    import time

    from rmpl_ds.evaluate.infer import _wait_all

    started = time.perf_counter()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert _wait_all([sleeper, failing]) == (1, 3)
    assert sleeper.poll() is not None and time.perf_counter() - started < 30


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (lambda root: root / "nowhere", "not a directory"),
        (lambda root: root, "no config.json"),
    ],
)
def test_a_bad_model_directory_exits_2(
    make_model: Callable[[Path], Path], message: str, demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(eval_args(make_model(tmp_path), demo, tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert error.startswith("rmpl-ds eval: error:") and message in error and "Traceback" not in error
    assert not (tmp_path / "out" / "scores.json").exists()


def test_an_unknown_model_type_exits_2(tmp_path: Path, demo: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    assert main(eval_args(model, demo, tmp_path / "out")) == 2
    assert "model_type 'llama' is none of the known backbones" in capsys.readouterr().err


def test_bad_m2e2_inputs_exit_2(
    tiny_model_dir: Callable[[str], Path], demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model_dir("qwen2-vl")
    assert main(eval_args(model, tmp_path, tmp_path / "out")) == 2
    assert "missing M2E2 file(s)" in capsys.readouterr().err
    empty_images = tmp_path / "images"
    empty_images.mkdir()
    args = eval_args(model, demo, tmp_path / "out")
    args[args.index("--images") + 1] = str(empty_images)
    assert main(args) == 2
    assert "4 annotated M2E2 image(s) missing" in capsys.readouterr().err
    assert main([*eval_args(model, demo, tmp_path / "out"), "--settings", "text,video"]) == 2
    assert "settings: expected" in capsys.readouterr().err
    assert main([*eval_args(model, demo, tmp_path / "out"), "--gpus", "0"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: parsed structures -> lines


def gold_answers(gold: M2E2Gold) -> list[TextEventPrediction | ImageEventPrediction]:
    """The lines the pipeline writes when every EM and AR answer is the gold one (parsed structures from
    tasks.to_structure, the exact shape tasks.parse returns)."""
    lines: list[TextEventPrediction | ImageEventPrediction] = []
    for sentence in gold.sentences:
        types = to_structure(sentence, "EM").event_types
        lines += text_events(sentence.id, types, {t: to_structure(sentence, "AR", t) for t in types})
    for record in gold.images:
        types = to_structure(record, "EM").event_types
        lines += image_events(record.id, types, {t: to_structure(record, "AR", t) for t in types})
    return lines


def test_gold_answers_score_100_in_text_and_image(gold: M2E2Gold, demo: Path) -> None:
    plan = plan_items(gold, demo / "image", EVAL_SETTINGS)
    predictions = finish_predictions(plan, reversed(gold_answers(gold)))  # order of the parts does not matter
    scores = score_m2e2(gold, predictions).to_json()
    for task in ("event_mention", "argument_role"):
        for setting in ("text_only", "image_only"):
            block = scores[task][setting]
            assert block["tp"] == block["gold"] == block["pred"] > 0, (task, setting)
        # Every gold triple is found; same-document pairs that no triple names cost precision only.
        assert scores[task]["multimedia"]["r"] == 100.0
    assert scores["event_mention_trigger"]["text_only"]["f1"] == 100.0


def test_boxes_come_back_in_original_pixels(gold: M2E2Gold, demo: Path) -> None:
    # The model sees the image at 512x512, but the answer is on the [0, 1000) grid of the image, and the record
    # carries the original size: parsed boxes are original pixels, within one grid cell of the gold.
    record = next(r for r in gold.images if r.events and (r.width, r.height) != (512, 512))
    image = load_image(demo / "image" / record.image)
    assert image.size == (record.width, record.height)
    event = record.events[0]
    example = render(record, "AR", image=image, event_type=event.event_type)
    assert (example.meta["width"], example.meta["height"]) == (record.width, record.height)
    parsed = parse("AR", example.target, example_meta=example.meta)
    [line] = image_events(record.id, [event.event_type], {event.event_type: parsed})
    gold_boxes = sorted((a.role, a.box) for a in event.arguments)
    predicted = sorted((a.role, a.box) for a in line.arguments)
    assert [role for role, _ in predicted] == [role for role, _ in gold_boxes]
    cell_x, cell_y = -(-record.width // 1000), -(-record.height // 1000)
    for (_, (x1, y1, x2, y2)), (_, (gx1, gy1, gx2, gy2)) in zip(predicted, gold_boxes, strict=True):
        assert abs(x1 - gx1) <= cell_x and abs(x2 - gx2) <= cell_x
        assert abs(y1 - gy1) <= cell_y and abs(y2 - gy2) <= cell_y


def test_a_hand_written_box_maps_to_the_image_size() -> None:
    record = ImageRecord("doc_1", "m2e2", "test", "doc_1.jpg", 2000, 1000)
    meta = {"task": "AR", "record_kind": record.kind, "modality": "image", "width": 2000, "height": 1000}
    meta["event_type"] = "Conflict:Attack"
    parsed = parse("AR", "Attacker: [250,500,499,999] ; Instrument: [0,0,1,1]", example_meta=meta)
    [line] = image_events(record.id, ["Conflict:Attack"], {"Conflict:Attack": parsed})
    # x is scaled by 2000 / 1000, y by 1000 / 1000: each coordinate is the middle of its grid cell's pixels.
    assert line.arguments == (
        BoxArgumentPrediction("Attacker", (500, 500, 998, 999)),
        BoxArgumentPrediction("Instrument", (0, 0, 2, 1)),
    )


def test_text_lines_keep_em_types_without_mentions_and_unfound_strings() -> None:
    attack = Parsed(
        task="AR",
        events=(
            ParsedEvent(
                "Conflict:Attack",
                trigger="fired",
                trigger_span=(3, 4),
                arguments=(
                    ParsedArgument("Attacker", text="soldiers", span=(0, 1)),
                    ParsedArgument("Attacker", text="soldiers", span=(0, 1)),  # said twice: one argument
                    ParsedArgument("Target", text="the moon", span=None),  # not in the sentence: kept as text
                ),
            ),
            ParsedEvent("Conflict:Attack", trigger="shot", trigger_span=None),
        ),
        errors=1,
    )
    lines = text_events("doc_0", ["Conflict:Attack", "Life:Die"], {"Conflict:Attack": attack})
    assert lines == [
        TextEventPrediction(
            "doc_0",
            "Conflict:Attack",
            (3, 4),
            (TextArgumentPrediction("Attacker", span=(0, 1)), TextArgumentPrediction("Target", text="the moon")),
        ),
        TextEventPrediction("doc_0", "Conflict:Attack", None),
        TextEventPrediction("doc_0", "Life:Die"),  # EM said Life:Die, AR found no mention: the unit still counts
    ]


def test_multimedia_pairs_share_a_document_and_a_type() -> None:
    soldiers = TextArgumentPrediction("Attacker", span=(0, 1))
    village = TextArgumentPrediction("Target", span=(5, 6))
    tank = BoxArgumentPrediction("Instrument", (1, 2, 3, 4))
    crowd = BoxArgumentPrediction("Entity", (5, 6, 7, 8))
    text = [
        TextEventPrediction("docA_1", "Conflict:Attack", (2, 3), (soldiers,)),
        TextEventPrediction("docA_1", "Conflict:Attack", (7, 8), (village, soldiers)),
        TextEventPrediction("docA_1", "Life:Die"),
        TextEventPrediction("docA_2", "Conflict:Demonstrate"),
        TextEventPrediction("docB_1", "Conflict:Attack", (0, 1)),
        TextEventPrediction("doc_with_underscores_3", "Conflict:Attack"),
    ]
    image = [
        ImageEventPrediction("docA_1", "Conflict:Attack", (tank,)),  # same id as a sentence: another item
        ImageEventPrediction("docA_1", "Life:Die"),
        ImageEventPrediction("docA_7", "Conflict:Demonstrate", (crowd,)),
        ImageEventPrediction("docC_0", "Conflict:Attack", (tank,)),  # no sentence of docC
        ImageEventPrediction("doc_with_underscores_0", "Conflict:Attack"),
    ]
    pairs = pair_multimedia(text, image)
    assert pairs == [
        MultimediaEventPrediction("docA_1", "docA_1", "Conflict:Attack", (soldiers, village), (tank,)),
        MultimediaEventPrediction("docA_1", "docA_1", "Life:Die"),
        MultimediaEventPrediction("docA_2", "docA_7", "Conflict:Demonstrate", (), (crowd,)),
        MultimediaEventPrediction("doc_with_underscores_3", "doc_with_underscores_0", "Conflict:Attack"),
    ]
    # The pairs do not depend on the order of the lines (only their order does).
    assert sorted(map(repr, pair_multimedia(text[::-1], image[::-1]))) == sorted(map(repr, pairs))


# ---------------------------------------------------------------------------------------------------------------
# Which items run, and how ranks split them


def test_plan_includes_unannotated_images_of_the_articles(gold: M2E2Gold, demo: Path, tmp_path: Path) -> None:
    plan = plan_items(gold, demo / "image", EVAL_SETTINGS)
    images = [item.item_id for item in plan.items if item.modality == "image"]
    assert len(images) == 5 and set(images) > {record.id for record in gold.images}
    assert images == sorted(images)
    assert [item.index for item in plan.items] == list(range(len(gold.sentences) + 5))
    # Shards are disjoint, cover every item, and do not depend on anything but the index.
    shards = [plan.shard(rank, 3) for rank in range(3)]
    assert sorted(item.index for shard in shards for item in shard) == list(range(len(plan.items)))
    assert all(item.index % 3 == rank for rank, shard in enumerate(shards) for item in shard)


def test_settings_choose_items_and_lines(gold: M2E2Gold, demo: Path) -> None:
    text_only = plan_items(gold, demo / "image", ["text"])
    assert text_only.counts() == {"sentences": 14, "images": 0}
    multimedia = plan_items(gold, demo / "image", "multimedia")
    # Both demo documents have images, so every sentence can pair; the lines written are multimedia ones only.
    assert multimedia.counts() == {"sentences": 14, "images": 5}
    lines = gold_answers(gold)
    predictions = finish_predictions(multimedia, lines)
    assert predictions.multimedia and not predictions.text and not predictions.image
    assert finish_predictions(text_only, [line for line in lines if isinstance(line, TextEventPrediction)]) == (
        Predictions(text=tuple(line for line in lines if isinstance(line, TextEventPrediction)))
    )


def test_limit_restricts_items_and_gold(gold: M2E2Gold, demo: Path) -> None:
    plan = plan_items(gold, demo / "image", EVAL_SETTINGS, limit=2)
    assert plan.counts() == {"sentences": 2, "images": 2}
    kept = {item.item_id for item in plan.items}
    assert {s.id for s in plan.gold.sentences} <= kept and {r.id for r in plan.gold.images} <= kept
    assert all(link.sentence_id in kept and link.image_id in kept for link in plan.gold.coref)
    with pytest.raises(UserError, match="limit must be >= 1"):
        plan_items(gold, demo / "image", EVAL_SETTINGS, limit=0)


def test_model_name_of_a_stage_export(tmp_path: Path) -> None:
    assert model_name(tmp_path / "run" / "stage2" / "export") == "stage2"
    assert model_name(tmp_path / "Qwen2-VL-7B-Instruct") == "Qwen2-VL-7B-Instruct"
