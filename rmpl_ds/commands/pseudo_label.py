"""Pseudo-label unlabeled image-caption pairs with a trained export (X-MTL's self-training data; rmpl_ds.pseudo).

  rmpl-ds pseudo-label --model EXPORT --pairs SHARDS --out SHARDS [--threshold 0.8] [--gpus N] [--batch-size B]
                       [--max-new-tokens N] [--limit N] [--decisions FILE]

For each pair of --pairs (a shard set built with `rmpl-ds shards build --source pairs`), the model answers EM on the
caption and on the image; the pair is kept when both answers parse, both name event types, the two sets share at
least one type (the agreed types) and both answers' confidences are >= --threshold. Confidence = exp(mean
log-probability of the greedy answer's tokens, its end token included). The model then answers AR for each agreed
type on both sides, and each kept pair becomes a sentence record (caption tokens, the predicted triggers and
arguments) and an image record (the image, the predicted boxes), written as the shard set --out (source `pseudo`;
its manifest has `pseudo: true`, the model, the threshold, the confidence definition and the counts: read, kept,
rejected by reason: unparsable, no_event, disagree, low_confidence_text, low_confidence_image, no_trigger).

--gpus N runs N worker processes (one GPU each, or the CPU's cores split), pair i on rank i % N; the output does
not depend on N. Nothing is written when no pair is kept (exit 2 with the counts), and --out appears only complete.

Example:
  rmpl-ds shards build --source pairs --input demo_out/raw/pairs --out shards/demo/pairs
  rmpl-ds pseudo-label --model runs/demo/stage2/export --pairs shards/demo/pairs --out shards/demo/pseudo
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

HELP = "label unlabeled image-caption pairs with a trained export and keep the agreeing, confident ones"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmpl_ds.pseudo import DEFAULT_THRESHOLD

    parser.add_argument("--model", required=True, type=Path, help="a stage export or a Hugging Face model directory")
    parser.add_argument("--pairs", required=True, type=Path, help="shard set of caption pairs (--source pairs)")
    parser.add_argument("--out", required=True, type=Path, help="shard set directory to write (replaced when done)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"keep pairs whose two EM confidences are >= this, in (0, 1] (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--gpus", type=int, default=1, help="worker processes, one GPU each (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per generation batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap in tokens (default 128)")
    parser.add_argument("--limit", type=int, default=None, help="label only the first N pairs")
    parser.add_argument("--family", default=None, help="the backbone family (default: from config.json)")
    parser.add_argument(
        "--box-format",
        choices=("native", "plain"),
        default=None,
        help="the box syntax the model writes (default: the export's, else native)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard (default 1000)")
    parser.add_argument("--decisions", type=Path, default=None, help="also write one JSON line per pair read here")


def run(args: argparse.Namespace) -> int:
    from rmpl_ds.pseudo import pseudo_label

    # Libraries that print to stdout while importing must not mix with the summary.
    with contextlib.redirect_stdout(sys.stderr):
        manifest = pseudo_label(
            args.model,
            args.pairs,
            args.out,
            threshold=args.threshold,
            gpus=args.gpus,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            family=args.family,
            box_format=args.box_format,
            shard_size=args.shard_size,
            decisions=args.decisions,
        )
    counts = manifest["counts"]
    rejected = ", ".join(f"{reason} {count}" for reason, count in counts["rejected"].items() if count) or "none"
    kept_types = ", ".join(f"{event_type} {count}" for event_type, count in counts["kept_by_type"].items())
    print(f"{args.out}: kept {counts['kept']} of {counts['read']} pairs ({manifest['samples']} records)")
    print(f"  rejected: {rejected}")
    print(f"  kept by type: {kept_types}")
    return 0
