"""Score M2E2 predictions: P, R, F1 (micro, with tp/pred/gold) and macro-F1 in every setting.

  rmpl-ds score --gold M2E2_DIR --pred predictions.jsonl [--json]
  rmpl-ds score --gold M2E2_DIR --pred /dev/null --json            # the gold counts, everything else 0
  rmpl-ds score --gold M2E2_DIR --pred ours=a.jsonl --pred base=b.jsonl --report-dir out/

M2E2_DIR holds the five annotation files (or their m2e2_annotations/ folder). With several --pred, --json
prints one object keyed by model name, each value the object below. --report-dir writes report.md (the
paper's Table 2 layout, one row per model), f1.png and scores.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rmpl_ds.errors import UserError
from rmpl_ds.evaluate.m2e2 import DEFAULT_IOU_THRESHOLD, RULES

# The rules are part of --help (the CLI shows the module docstring) and have one source, the scorer's RULES.
__doc__ = f"{__doc__}\n{RULES}"

HELP = "score M2E2 predictions (text-only, image-only, multimedia; union variants; raw counts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gold", required=True, metavar="M2E2_DIR", help="folder with the five M2E2 annotation files")
    parser.add_argument(
        "--pred",
        required=True,
        action="append",
        metavar="[NAME=]FILE",
        help="prediction JSON Lines file; repeat to compare models (NAME defaults to the file's stem)",
    )
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    parser.add_argument(
        "--iou-threshold",
        type=float,
        default=DEFAULT_IOU_THRESHOLD,
        help=f"a box matches a gold box at IoU >= this, in (0, 1] (default {DEFAULT_IOU_THRESHOLD})",
    )
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip malformed prediction lines (counted) instead of failing"
    )
    parser.add_argument("--report-dir", metavar="DIR", help="also write report.md, f1.png and scores.json here")


def parse_pred_argument(value: str) -> tuple[str, Path]:
    """``"ours=a.jsonl"`` -> ("ours", a.jsonl); ``"runs/a.jsonl"`` -> ("a", runs/a.jsonl).

    A value that names an existing file is a path even if it contains ``=``.
    """
    name, sep, path = value.partition("=")
    if sep and name and path and not Path(value).exists():
        return name, Path(path)
    return Path(value).stem or value, Path(value)


def run(args: argparse.Namespace) -> int:
    from rmpl_ds.evaluate.m2e2 import read_predictions, score_m2e2
    from rmpl_ds.sources.m2e2 import load_m2e2

    if not 0.0 < args.iou_threshold <= 1.0:
        raise UserError(f"--iou-threshold must be in (0, 1], found {args.iou_threshold}")
    models = [parse_pred_argument(value) for value in args.pred]
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise UserError(f"--pred: two prediction files have the same model name ({', '.join(names)}); use NAME=FILE")
    # The gold must be read whole: a skipped gold record would silently change every denominator.
    gold = load_m2e2(args.gold, strict=True)
    results: dict[str, dict[str, Any]] = {}
    for name, path in models:
        predictions = read_predictions(path, skip_bad_lines=args.skip_bad_lines)
        # The first few reasons are enough to find the bug in a writer; the count goes into the scores.
        for reason in predictions.skipped[:5]:
            print(f"rmpl-ds score: skipped {reason}", file=sys.stderr)
        if len(predictions.skipped) > 5:
            print(f"rmpl-ds score: ... {len(predictions.skipped) - 5} more skipped lines in {path}", file=sys.stderr)
        results[name] = score_m2e2(gold, predictions, iou_threshold=args.iou_threshold).to_json()
    if args.report_dir:
        from rmpl_ds.evaluate.report import write_report

        write_report(args.report_dir, results, extra_md=_provenance(args, models))
    if args.json:
        print(json.dumps(results[names[0]] if len(results) == 1 else results, indent=2))
    else:
        for name, path in models:
            print(format_scores(name, path, results[name]))
    return 0


def _provenance(args: argparse.Namespace, models: list[tuple[str, Path]]) -> str:
    files = "\n".join(f"- {name}: `{path}`" for name, path in models)
    return f"Gold: `{args.gold}`; IoU threshold {args.iou_threshold:g}.\n\nPredictions:\n{files}\n"


def format_scores(name: str, path: Path, scores: dict[str, Any]) -> str:
    """The human-readable summary `rmpl-ds score` prints without --json."""
    header = f"{'':<28}{'P':>7}{'R':>7}{'F1':>7}{'mF1':>7}{'tp':>7}{'pred':>7}{'gold':>7}"
    lines = [f"{name} ({path}), IoU >= {scores['iou_threshold']:g}", header]

    def row(label: str, s: dict[str, Any]) -> str:
        return (
            f"  {label:<26}{s['p']:7.1f}{s['r']:7.1f}{s['f1']:7.1f}{s['macro_f1']:7.1f}"
            f"{s['tp']:7d}{s['pred']:7d}{s['gold']:7d}"
        )

    for task, title in (("event_mention", "event mention"), ("argument_role", "argument role")):
        lines.append(title)
        lines += [row(setting.replace("_", "-"), scores[task][setting]) for setting in scores[task]]
    lines.append("union (all text / all image events)")
    for task, title in (("event_mention", "event mention"), ("argument_role", "argument role")):
        lines += [row(f"{title} {modality}", s) for modality, s in scores["union"][task].items()]
    lines.append("event mention with trigger offsets")
    lines += [row(setting.replace("_", "-"), s) for setting, s in scores["event_mention_trigger"].items()]
    gold = scores["gold_counts"]
    lines.append(
        f"gold: text events {gold['text_events']} ({gold['text_only_events']} text-only + "
        f"{gold['text_multimedia_events']} multimedia), image events {gold['image_events']} "
        f"({gold['image_only_events']} image-only + {gold['image_multimedia_events']} multimedia), "
        f"coreference triples {gold['coref_triples']}"
    )
    predicted = scores["predictions"]
    ignored = ", ".join(f"{setting} {count}" for setting, count in predicted["ignored_units"].items())
    lines.append(
        f"predictions: {predicted['text_events']} text, {predicted['image_events']} image, "
        f"{predicted['multimedia_events']} multimedia lines; {predicted['skipped_lines']} skipped; "
        f"ignored event units: {ignored}"
    )
    return "\n".join(lines)
