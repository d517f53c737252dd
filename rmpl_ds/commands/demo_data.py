"""Write a small, learnable synthetic dataset in every real raw format, so the pipeline runs with no licensed data.

Writes ACE 2005 (nlpcl-lab JSON, train/dev/test), SWiG and imSitu (JSON + imsitu_space.json + drawn images),
MNRE (dict-literal lines including the `mnre_val .txt` name, + images) and M2E2 (the five annotation files +
images) under --out, then prints the counts and the `rmpl-ds shards build` command for each source. The event
type and roles are recoverable from the text (a trigger word per type, arguments in fixed slots) and from the
image (a large shape whose shape and colour encode the type, a small glyph per role with its box). The same
--seed and --size give byte-identical files.

With --tiny-model DIR it also writes a tiny random-initialized model of the --family architecture (a normal HF
directory with a locally trained tokenizer), the model the demo recipe trains.

Example:
  rmpl-ds demo-data --out demo_out/raw --seed 0 --size 300 --tiny-model demo_out/models/tiny-qwen2-vl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rmpl_ds.backbones import FAMILIES

HELP = "write a small learnable synthetic dataset in each real raw format (no licensed data needed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmpl_ds.sources.demo import DEFAULT_SIZE

    parser.add_argument("--out", required=True, type=Path, help="directory to write (a previous demo is replaced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"records per source, roughly (default {DEFAULT_SIZE})"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--tiny-model", type=Path, default=None, help="also write a tiny random model directory here")
    parser.add_argument(
        "--family", default="qwen2-vl", choices=sorted(FAMILIES), help="architecture of --tiny-model (default qwen2-vl)"
    )


def run(args: argparse.Namespace) -> int:
    from rmpl_ds.sources.demo import write_demo

    started = time.perf_counter()
    summary = write_demo(args.out, seed=args.seed, size=args.size)
    elapsed = time.perf_counter() - started
    if args.tiny_model is not None:
        from rmpl_ds.backbones.tiny import build_tiny

        build_tiny(args.family, args.tiny_model, seed=args.seed)
        print(f"{args.tiny_model}: tiny random-initialized {args.family} model")
    if args.json:
        print(json.dumps({**summary.to_json(), "build_commands": summary.build_commands}, indent=2))
        return 0
    print(f"{args.out}: demo data (seed {args.seed}, size {args.size}) written in {elapsed:.1f} s")
    for source, counts in summary.counts.items():
        scalars = ", ".join(f"{key} {value}" for key, value in counts.items() if isinstance(value, int))
        print(f"  {source}: {scalars}")
    print("build the shards with:")
    for command in summary.build_commands.values():
        print(f"  {command}")
    return 0
