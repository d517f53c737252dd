"""Evaluate a model on M2E2: greedy EM then AR generation, parsed, scored, reported.

  rmpl-ds eval --model DIR --m2e2 M2E2_DIR --images IMAGE_DIR --out OUT_DIR
               [--settings text,image,multimedia] [--batch-size N] [--gpus N] [--limit N] [--name NAME]
               [--box-format native|plain]

DIR is a Hugging Face model directory: the base model (the zero-shot baseline) or a stage export (merged
weights, or a LoRA adapter whose base model directory its manifest names). M2E2_DIR holds the five annotation
files (or their m2e2_annotations/ folder), IMAGE_DIR the <image id>.jpg files. Every sentence and every image
of the annotated articles gets an EM answer, and every predicted type an AR answer; images go to the model at
512x512 and boxes come back in the original image's pixels. A sentence S and an image I of one article that both
have type T make a multimedia event (S, I, T) with the text arguments and boxes of both. Malformed answers are
counted, never fatal.

Writes OUT_DIR/predictions.jsonl (the `rmpl-ds score` format), eval_stats.json (items, generations, parse
errors, seconds), report.md + f1.png and, last, scores.json (the `rmpl-ds score --json` object).
--gpus N runs N worker processes (cuda:0..N-1, or N CPU processes), each on every N-th item; the merged
predictions do not depend on N.

Example (the demo set with a tiny model):
  rmpl-ds demo-data --out demo_out/raw --size 20
  rmpl-ds eval --model demo_out/models/tiny-qwen2-vl --m2e2 demo_out/raw/m2e2 \\
      --images demo_out/raw/m2e2/image --out demo_out/eval/base --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

HELP = "evaluate a model on M2E2 (generate EM and AR, parse, score, write predictions and a report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face model directory or stage export")
    parser.add_argument("--m2e2", required=True, type=Path, help="folder with the five M2E2 annotation files")
    parser.add_argument("--images", required=True, type=Path, help="folder with the M2E2 images (<image id>.jpg)")
    parser.add_argument("--out", required=True, type=Path, help="where predictions, scores and the report go")
    parser.add_argument(
        "--settings",
        default="text,image,multimedia",
        help="which prediction lines to write, comma-separated (default text,image,multimedia)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default 128)")
    parser.add_argument("--gpus", type=int, default=1, help="ranks: worker processes, one GPU each (default 1)")
    parser.add_argument("--limit", type=int, help="only the first N sentences and N images (scored against their gold)")
    parser.add_argument("--name", help="model name in the report (default: the directory's, or the stage's)")
    parser.add_argument("--family", help="backbone family (default: from config.json's model_type)")
    parser.add_argument(
        "--box-format",
        choices=("native", "plain"),
        help="box syntax the model writes: its family's own or role: [x1,y1,x2,y2] (default: what a stage export "
        "was trained with, native for a base checkpoint)",
    )
    parser.add_argument(
        "--schema-guided",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prompts list every event type with its definition and roles (default: what a stage export was trained "
        "with, no for a base checkpoint)",
    )
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="box match threshold (default 0.5)")
    parser.add_argument(
        "--oracle-types",
        action="store_true",
        help="skip EM and ask AR for the gold event types (AR in isolation; EM scores become an oracle's)",
    )
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")


def run(args: argparse.Namespace) -> int:
    from rmpl_ds.commands.score import format_scores
    from rmpl_ds.evaluate.infer import PREDICTIONS_FILE, evaluate_model, model_name, parse_settings

    # Libraries that print to stdout while importing (DeepSpeed's accelerator notice) must not break --json.
    with contextlib.redirect_stdout(sys.stderr):
        scores = evaluate_model(
            args.model,
            args.m2e2,
            args.images,
            args.out,
            settings=parse_settings(args.settings),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            gpus=args.gpus,
            name=args.name,
            limit=args.limit,
            iou_threshold=args.iou_threshold,
            oracle_types=args.oracle_types,
            family=args.family,
            box_format=args.box_format,
            schema_guided=args.schema_guided,
        )
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        print(format_scores(args.name or model_name(args.model), args.out / PREDICTIONS_FILE, scores))
        print(f"report: {args.out / 'report.md'}")
    return 0
