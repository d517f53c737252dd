"""Benchmark: the M2E2 scorer on a full-size synthetic release, against a list-scan scorer in the style of older work.

The synthetic release has the sizes of the public one (FORMATS.md §1): 6,013 text-only sentences (932 with events,
1,105 events, 1,659 arguments), 192 multimedia sentences (38 of them also text-only; 307 arguments), 188 + 203
images (688 + 741 boxes) and 309 coreference triples. The predictions are the gold perturbed with a fixed seed:
events dropped, wrong types, shifted triggers, arguments as text, jittered and spurious boxes, wrong pairs,
every line written twice (about 2 x 1.6k text, 2 x 0.4k image and 2 x 0.3k multimedia lines).

Measured in one run (median and min of --repeats):

* ``score_m2e2`` alone (the pure core), ``read_predictions`` (parse and validate the JSON Lines), and the whole
  ``rmpl-ds score --json`` (reading the five gold files in the release format as well);
* the baseline: a list-scan scorer like the released scripts of older work (a prediction is looked up by scanning
  the gold list; a predicted box is correct if it overlaps any gold box of its image and role at IoU >= 0.5, with
  no one-to-one matching, as in X-MTL / MMUTF). It computes 3 of the score blocks ours computes (text-only and
  image-only event mentions, image-only argument roles; ours: every setting's event mentions and argument roles,
  the union, the trigger-only scores and more, counted in the table), so its time is for less work; its counts are
  reported next to ours to show what one-to-one matching and set semantics change.

Usage: python bench/bench_scorer.py [--repeats 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import cpu_model, revision, write_results

from rmpl_ds.cli import main as cli_main
from rmpl_ds.evaluate.m2e2 import (
    BoxArgumentPrediction,
    ImageEventPrediction,
    MultimediaEventPrediction,
    Predictions,
    TextArgumentPrediction,
    TextEventPrediction,
    box_iou,
    gold_as_predictions,
    read_predictions,
    score_m2e2,
    write_predictions,
)
from rmpl_ds.ontology import EVENT_TYPES, IMAGE_ROLES, TEXT_ROLES
from rmpl_ds.sources.m2e2 import M2E2Gold, load_m2e2

SIZES = {
    "text_only_sentences": 6013,
    "text_only_sentences_with_events": 932,
    "text_only_events": 1105,
    "text_only_arguments": 1659,
    "text_multimedia_sentences": 192,
    "overlapping_sentences": 38,
    "text_multimedia_arguments": 307,
    "image_only_events": 188,
    "image_only_boxes": 688,
    "image_multimedia_events": 203,
    "image_multimedia_boxes": 741,
    "coref_triples": 309,
}
SENTENCE_LENGTH = 25
IMAGE_SIZE = (2000, 1500)


def machine() -> dict[str, object]:
    model = cpu_model()
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version()}


# --- the synthetic release, written in the real file format ----------------------------------------------------


def _spread(total: int, slots: int) -> list[int]:
    """``total`` items over ``slots`` as evenly as possible (each slot gets at least total // slots)."""
    return [total // slots + (1 if k < total % slots else 0) for k in range(slots)]


def _text_record(sentence_id: str, events: list[tuple[str, int]], rng: random.Random) -> dict[str, Any]:
    """A sentence record; ``events`` is (type, number of arguments) per event, triggers and spans all distinct."""
    words = [f"w{k}" for k in range(SENTENCE_LENGTH - 1)] + ["."]
    positions = rng.sample(range(SENTENCE_LENGTH - 1), sum(1 + count for _, count in events))
    mentions = []
    for event_type, count in events:
        trigger = positions.pop()
        roles = TEXT_ROLES[event_type]
        arguments = []
        for number in range(count):
            start = positions.pop()
            arguments.append(
                {"role": roles[number % len(roles)], "start": start, "end": start + 1, "text": words[start]}
            )
        mentions.append(
            {
                "trigger": {"start": trigger, "end": trigger + 1, "text": words[trigger]},
                "event_type": event_type,
                "arguments": arguments,
            }
        )
    return {
        "sentence_id": sentence_id,
        "sentence_start": 0,
        "sentence_end": 0,
        "sentence": " ".join(words),
        "words": words,
        "index": [["0", "0"]] * len(words),
        "pos-tags": ["NN"] * len(words),
        "combined-parsing": ["dep=0/gov=-1"] * len(words),
        "golden-entity-mentions": [],
        "golden-event-mentions": mentions,
        "image": [],
    }


def _image_entry(event_type: str, boxes: int, rng: random.Random) -> dict[str, Any]:
    roles: dict[str, list[list[Any]]] = {}
    for number in range(boxes):
        role = IMAGE_ROLES[event_type][number % len(IMAGE_ROLES[event_type])]
        x1, y1 = rng.randrange(0, IMAGE_SIZE[0] - 200), rng.randrange(0, IMAGE_SIZE[1] - 200)
        roles.setdefault(role, []).append(["1", x1, y1, x1 + rng.randrange(50, 200), y1 + rng.randrange(50, 200)])
    return {"role": roles, "event_type": event_type}


def write_release(folder: Path, seed: int = 0) -> None:
    """The five M2E2 files with the public release's sizes (see SIZES), in its serialization."""
    rng = random.Random(seed)
    with_events = SIZES["text_only_sentences_with_events"]
    second_events = SIZES["text_only_events"] - with_events
    event_arguments = _spread(SIZES["text_only_arguments"], SIZES["text_only_events"])
    text_only, numbered = [], 0
    for k in range(SIZES["text_only_sentences"]):
        events = []
        if k < with_events:
            types = rng.sample(EVENT_TYPES, 2 if k < second_events else 1)
            for event_type in types:
                events.append((event_type, event_arguments[numbered]))
                numbered += 1
        text_only.append(_text_record(f"VOA_{k // 25}_{k % 25}", events, rng))
    multimedia_types = [EVENT_TYPES[k % len(EVENT_TYPES)] for k in range(SIZES["text_multimedia_sentences"])]
    multimedia_arguments = _spread(SIZES["text_multimedia_arguments"], SIZES["text_multimedia_sentences"])
    text_multimedia = []
    for k, event_type in enumerate(multimedia_types):
        if k < SIZES["overlapping_sentences"]:
            # Reuse a text-only sentence's id and words with an event of another type, as the real overlap does.
            record = json.loads(json.dumps(text_only[k]))
            taken = {m["event_type"] for m in record["golden-event-mentions"]}
            event_type = next(t for t in EVENT_TYPES[k % 8 :] + EVENT_TYPES[: k % 8] if t not in taken)
            multimedia_types[k] = event_type
            used = {m["trigger"]["start"] for m in record["golden-event-mentions"]}
            used |= {a["start"] for m in record["golden-event-mentions"] for a in m["arguments"]}
            free = [p for p in range(SENTENCE_LENGTH - 1) if p not in used]
            trigger, *spans = rng.sample(free, 1 + multimedia_arguments[k])
            record["golden-event-mentions"] = [
                {
                    "trigger": {"start": trigger, "end": trigger + 1, "text": record["words"][trigger]},
                    "event_type": event_type,
                    "arguments": [
                        {"role": TEXT_ROLES[event_type][n % len(TEXT_ROLES[event_type])], "start": s, "end": s + 1,
                         "text": record["words"][s]}
                        for n, s in enumerate(spans)
                    ],
                }
            ]  # fmt: skip
            text_multimedia.append(record)
        else:
            text_multimedia.append(_text_record(f"MM_{k}_0", [(event_type, multimedia_arguments[k])], rng))
    image_only = {
        f"IMG_{k}_0": _image_entry(EVENT_TYPES[k % 8], boxes, rng)
        for k, boxes in enumerate(_spread(SIZES["image_only_boxes"], SIZES["image_only_events"]))
    }
    image_types = [EVENT_TYPES[k % 8] for k in range(SIZES["image_multimedia_events"])]
    image_multimedia = {
        f"MMIMG_{k}_0": _image_entry(image_types[k], boxes, rng)
        for k, boxes in enumerate(_spread(SIZES["image_multimedia_boxes"], SIZES["image_multimedia_events"]))
    }
    # Coreference: every multimedia sentence and image at least once, pairs of the same type, 309 distinct lines.
    sentence_ids = [record["sentence_id"] for record in text_multimedia]
    by_type: dict[str, tuple[list[str], list[str]]] = {t: ([], []) for t in EVENT_TYPES}
    for sentence_id, event_type in zip(sentence_ids, multimedia_types, strict=True):
        by_type[event_type][0].append(sentence_id)
    for k, event_type in enumerate(image_types):
        by_type[event_type][1].append(f"MMIMG_{k}_0")
    triples: dict[tuple[str, str, str], None] = {}
    for event_type, (sentences, images) in by_type.items():
        for k in range(max(len(sentences), len(images))):
            triples[(sentences[k % len(sentences)], images[k % len(images)], event_type)] = None
    while len(triples) < SIZES["coref_triples"]:
        event_type = rng.choice(EVENT_TYPES)
        sentences, images = by_type[event_type]
        triples[(rng.choice(sentences), rng.choice(images), event_type)] = None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text_only_event.json").write_text(json.dumps(text_only, indent=4))
    (folder / "text_multimedia_event.json").write_text(json.dumps(text_multimedia, indent=4))
    (folder / "image_only_event.json").write_text(json.dumps(image_only, indent=4))
    (folder / "image_multimedia_event.json").write_text(json.dumps(image_multimedia, indent=4))
    (folder / "crossmedia_coref.txt").write_text("\n".join(f"{s}\t{i}.jpg\t{t}" for s, i, t in triples))


# --- perturbed predictions -------------------------------------------------------------------------------------


def perturb(gold: M2E2Gold, seed: int = 1) -> Predictions:
    """The gold as predictions with the errors a real system makes (each line once)."""
    rng = random.Random(seed)
    exact = gold_as_predictions(gold)
    words = {sentence.id: sentence.tokens for sentence in gold.sentences}
    text: list[TextEventPrediction] = []
    for prediction in exact.text:
        if rng.random() < 0.25:
            continue
        event_type = rng.choice(EVENT_TYPES) if rng.random() < 0.1 else prediction.event_type
        start, end = prediction.trigger or (0, 1)
        trigger = (start + 1, end + 1) if rng.random() < 0.1 and end < SENTENCE_LENGTH - 1 else (start, end)
        arguments = []
        for argument in prediction.arguments:
            if rng.random() < 0.3 or argument.span is None:
                continue
            if rng.random() < 0.2:
                arguments.append(
                    TextArgumentPrediction(
                        argument.role, text=" ".join(words[prediction.sentence_id][slice(*argument.span)])
                    )
                )
            else:
                arguments.append(argument)
        text.append(TextEventPrediction(prediction.sentence_id, event_type, trigger, tuple(arguments)))
    negatives = [sentence.id for sentence in gold.sentences if not sentence.events]
    for sentence_id in rng.sample(negatives, 500):
        text.append(
            TextEventPrediction(
                sentence_id, rng.choice(EVENT_TYPES), (3, 4), (TextArgumentPrediction("Place", (5, 6)),)
            )
        )
    image = [
        ImageEventPrediction(prediction.image_id, prediction.event_type, _jitter(prediction.arguments, rng))
        for prediction in exact.image
        if rng.random() < 0.8
    ]
    image += [ImageEventPrediction(f"NEG_{k}_0", rng.choice(EVENT_TYPES), _jitter((), rng)) for k in range(60)]
    multimedia = [
        MultimediaEventPrediction(
            p.sentence_id, p.image_id, p.event_type, p.text_arguments, _jitter(p.image_arguments, rng)
        )
        for p in exact.multimedia
        if rng.random() < 0.7
    ]
    sentence_ids = [p.sentence_id for p in exact.multimedia]
    image_ids = [p.image_id for p in exact.multimedia]
    multimedia += [
        MultimediaEventPrediction(rng.choice(sentence_ids), rng.choice(image_ids), rng.choice(EVENT_TYPES))
        for _ in range(100)
    ]
    return Predictions.of([*text, *image, *multimedia])


def _jitter(arguments: tuple[BoxArgumentPrediction, ...], rng: random.Random) -> tuple[BoxArgumentPrediction, ...]:
    """Move each box by up to 15% of its size, drop 20%, add a spurious box."""
    moved = []
    for argument in arguments:
        if rng.random() < 0.2:
            continue
        x1, y1, x2, y2 = argument.box
        dx, dy = (x2 - x1) * rng.uniform(-0.15, 0.15), (y2 - y1) * rng.uniform(-0.15, 0.15)
        moved.append(BoxArgumentPrediction(argument.role, (x1 + dx, y1 + dy, x2 + dx, y2 + dy)))
    x1, y1 = rng.uniform(0, 1800), rng.uniform(0, 1300)
    moved.append(BoxArgumentPrediction("Agent", (x1, y1, x1 + 150, y1 + 150)))
    return tuple(moved)


# --- the baseline ----------------------------------------------------------------------------------------------


def list_scan_scores(gold: M2E2Gold, predictions: Predictions) -> dict[str, dict[str, int]]:
    """Text-only and image-only tp/pred/gold as older released scripts compute them: lists, not sets, and a box
    is right if it overlaps any gold box of its image and role (no one-to-one matching)."""
    text_gold = [(s.id, e.event_type) for s in gold.sentences for e in s.events if e.setting == "text_only"]
    text_sentences = {s.id for s in gold.sentences if not s.events or any(e.setting == "text_only" for e in s.events)}
    text_pred = [(p.sentence_id, p.event_type) for p in predictions.text if p.sentence_id in text_sentences]
    image_gold = [(r.id, e.event_type) for r in gold.images for e in r.events if e.setting == "image_only"]
    image_pred = [(p.image_id, p.event_type) for p in predictions.image]
    gold_boxes = [
        (r.id, e.event_type, a.role, a.box) for r in gold.images for e in r.events if e.setting == "image_only"
        for a in e.arguments
    ]  # fmt: skip
    pred_boxes = [(p.image_id, p.event_type, a.role, a.box) for p in predictions.image for a in p.arguments]
    box_hits = sum(
        1
        for image_id, event_type, role, box in pred_boxes
        if any(g[:3] == (image_id, event_type, role) and box_iou(box, g[3]) >= 0.5 for g in gold_boxes)
    )
    return {
        "text_only_event_mention": {
            "tp": sum(1 for unit in text_pred if unit in text_gold),
            "pred": len(text_pred),
            "gold": len(text_gold),
        },
        "image_only_event_mention": {
            "tp": sum(1 for unit in image_pred if unit in image_gold),
            "pred": len(image_pred),
            "gold": len(image_gold),
        },
        "image_only_argument_role": {"tp": box_hits, "pred": len(pred_boxes), "gold": len(gold_boxes)},
    }


# --- measurement -----------------------------------------------------------------------------------------------


def timed(function: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, float]]:
    timings, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        timings.append(time.perf_counter() - started)
    return result, {"median_s": statistics.median(timings), "min_s": min(timings)}


def run_cli(argv: list[str]) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    assert code == 0, f"rmpl-ds {' '.join(argv)} exited {code}"
    return json.loads(out.getvalue())


def markdown(report: dict[str, Any]) -> str:
    t = report["timings"]
    lines = [
        "# Scorer benchmark",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']['nproc']} CPUs, {report['machine']['cpu']}, "
        f"Python {report['machine']['python']}",
        f"- date: {report['date']}",
        f"- code: rmpl_ds at {report['revision']}",
        f"- data: synthetic release with the public sizes ({report['gold_counts']['text_events']} text events, "
        f"{report['gold_counts']['image_events']} image events, {report['gold_counts']['coref_triples']} triples, "
        f"{report['gold_counts']['sentences']} sentences); {report['prediction_lines']} prediction lines "
        "(every line twice)",
        f"- {report['repeats']} repeats; seconds, median (min)",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    for key, label in (
        ("score_m2e2", f"`score_m2e2` (pure core: all {report['score_blocks']['ours']} score blocks)"),
        ("read_predictions", "`read_predictions` (parse + validate JSON Lines)"),
        ("cli_end_to_end", "`rmpl-ds score --json` (gold files + predictions + scoring)"),
        (
            "baseline_list_scan",
            f"baseline: list-scan scorer, {report['score_blocks']['baseline']} of our {report['score_blocks']['ours']} "
            "score blocks (text-only and image-only event mentions, image-only argument roles)",
        ),
    ):
        lines.append(f"| {label} | {t[key]['median_s']:.3f} ({t[key]['min_s']:.3f}) |")
    lines += ["", "## Counts: ours versus the list-scan baseline on the same predictions", ""]
    lines += [
        "| setting | ours (lines once or twice) | baseline, lines once | baseline, lines twice |",
        "|---|---|---|---|",
    ]
    for key, ours in report["ours"].items():
        cells = [ours, report["baseline_lines_once"][key], report["baseline_lines_twice"][key]]
        lines.append(f"| {key} | " + " | ".join(f"{c['tp']} / {c['pred']} / {c['gold']}" for c in cells) + " |")
    lines += [
        "",
        "tp / pred / gold. The baseline lets one predicted box match any number of gold boxes, scores the images of "
        "multimedia events in image-only, and counts a repeated line again (recall can pass 100%); ours scores sets, "
        "ignores what the rules ignore and matches boxes one to one.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        release = Path(scratch) / "m2e2"
        write_release(release)
        gold = load_m2e2(release, strict=True)
        unique = perturb(gold)
        # Every line twice: a set-based scorer must not notice, a list-based one does.
        predictions = Predictions.of([*unique.events(), *unique.events()])
        prediction_file = write_predictions(Path(scratch) / "pred.jsonl", predictions)
        scores, score_time = timed(lambda: score_m2e2(gold, predictions), args.repeats)
        read, read_time = timed(lambda: read_predictions(prediction_file), args.repeats)
        assert score_m2e2(gold, read).to_json() == scores.to_json()
        cli_scores, cli_time = timed(
            lambda: run_cli(["score", "--gold", str(release), "--pred", str(prediction_file), "--json"]), args.repeats
        )
        assert cli_scores == scores.to_json()
        baseline, baseline_time = timed(lambda: list_scan_scores(gold, predictions), args.repeats)
        baseline_unique = list_scan_scores(gold, unique)
        assert score_m2e2(gold, unique).to_json()["event_mention"] == scores.to_json()["event_mention"]
    as_json = scores.to_json()
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "repeats": args.repeats,
        "gold_counts": as_json["gold_counts"],
        "prediction_lines": sum(1 for _ in predictions.events()),
        "timings": {
            "score_m2e2": score_time,
            "read_predictions": read_time,
            "cli_end_to_end": cli_time,
            "baseline_list_scan": baseline_time,
        },
        "ours": {
            "text_only_event_mention": _counts(as_json["event_mention"]["text_only"]),
            "image_only_event_mention": _counts(as_json["event_mention"]["image_only"]),
            "image_only_argument_role": _counts(as_json["argument_role"]["image_only"]),
        },
        "baseline_lines_twice": baseline,
        # tp / pred / gold blocks each scorer computes
        "score_blocks": {"ours": score_blocks(as_json), "baseline": len(baseline)},
        "baseline_lines_once": baseline_unique,
        "scores": as_json,
    }
    write_results(args.out, "scorer", report, markdown)
    return 0


def score_blocks(scores: Any) -> int:
    """How many tp / pred / gold blocks a score report holds (every setting, task, union and trigger score)."""
    if isinstance(scores, dict):
        return int({"tp", "pred", "gold"} <= scores.keys()) + sum(score_blocks(value) for value in scores.values())
    return 0


def _counts(block: dict[str, Any]) -> dict[str, int]:
    return {"tp": block["tp"], "pred": block["pred"], "gold": block["gold"]}


if __name__ == "__main__":
    sys.exit(main())
