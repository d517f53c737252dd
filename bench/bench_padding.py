"""Benchmark: real-token fraction of our collation versus naive padding, on the demo mixture.

The demo recipe's two stages (launch/recipes/demo.yaml: Stage I ace:t / swig:i / mnre:r 1:1:1, Stage II ace:EM /
swig:EM / ace:AR / swig:AR 1:1:1:1, micro-batch 8, global batch 16) over the demo shards (built as in
bench_data.py), for every slot the stage trains on (steps × global batch), in the slot stream's order
(rmpl_ds.mixing). Each slot's encoded length comes from running the training run's own loader
(``StageData.loader``: render, encode with the tiny Qwen2-VL bundle, collate), so the lengths, the images and the
per-batch statistics are the real ones. Real tokens / padded slots for:

* ``contiguous``: contiguous micro-batches of 8 padded to their longest row: **what the training run gets**, since
  the loader hands each rank contiguous slots. "As trained" is measured
  from the loader's own ``BatchStats`` (the number the loop logs as ``real_token_fraction``), including the
  dummy image a text-only micro-batch carries; the simulated value must equal it (checked);
* ``max_seq_len``: every row padded to the recipe's ``model.max_seq_len`` (static shapes);
* ``length_grouped``: :func:`length_grouped_batches` below (windows of 8 × group_batches slots sorted by length, so
  every window keeps its sample set and the mixture ratios), for several window sizes: a what-if, not a loader
  mode (the loader hands out contiguous slots);
* ``global_sort``: all slots of the stage sorted by length: the bound no windowed scheme can beat (it destroys
  the per-step mixture, so it is a reference, not an option).

Rows are simulated with the collator's rule for the dummy image (appended, masked, to the shortest row of a
text-only micro-batch), so schemes that put text-only samples together pay for it.

Usage: python bench/bench_padding.py [--quick] [--stages stage1 stage2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_data import build_demo, demo_recipe, load_bundle, machine, machine_line, revision
from benchlib import write_results

GROUP_BATCHES = (4, 16, 64)
DEFAULT_GROUP_BATCHES = 16  # length_grouped_batches' default


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    group_batches: int = 16,
    seed: int = 0,
) -> list[list[int]]:
    """Cut indices ``0 .. len(lengths)-1`` into batches of similar length.

    Consecutive windows of ``batch_size × group_batches`` indices are sorted by length (longest first) and cut
    into batches of ``batch_size`` (the last one of the whole list may be smaller); the batches of each window
    are then shuffled with a generator seeded by ``(seed, window)``. Every index appears exactly once and no
    index leaves its window, so a sampler's per-window mixture ratios survive. Pure.
    """
    if batch_size <= 0 or group_batches <= 0:
        raise ValueError(f"batch_size and group_batches must be > 0, got {batch_size}, {group_batches}")
    window = batch_size * group_batches
    batches: list[list[int]] = []
    for window_index, start in enumerate(range(0, len(lengths), window)):
        indices = sorted(range(start, min(start + window, len(lengths))), key=lambda index: (-lengths[index], index))
        window_batches = [indices[offset : offset + batch_size] for offset in range(0, len(indices), batch_size)]
        random.Random(f"{seed}:{window_index}").shuffle(window_batches)
        batches.extend(window_batches)
    return batches


def real_token_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / padded slots over ``batches`` of indices into ``lengths`` (right padding to each batch's
    longest row)."""
    real = sum(lengths[index] for batch in batches for index in batch)
    slots = sum(len(batch) * max(lengths[index] for index in batch) for batch in batches if batch)
    return real / slots if slots else 1.0


def padded_fraction(
    lengths: Sequence[int], has_image: Sequence[bool], batches: Sequence[Sequence[int]], dummy_tokens: int
) -> float:
    """Real tokens / slots over ``batches``, padding each to its longest row after the collator has appended the
    dummy image (``dummy_tokens`` masked tokens) to the shortest row of a batch without images."""
    real = slots = 0
    for batch in batches:
        rows = [lengths[index] for index in batch]
        if not any(has_image[index] for index in batch):
            rows[rows.index(min(rows))] += dummy_tokens
        real += sum(lengths[index] for index in batch)
        slots += len(rows) * max(rows)
    return real / slots if slots else 1.0


def stage_lengths(data: Any, slots: int, micro: int) -> dict[str, Any]:
    """Run the stage's real loader over ``slots`` slots: per-slot lengths, image flags, stream indices, and the
    loader's own totals of real tokens and padded slots (what the training loop logs)."""
    loader = data.loader(next_slot=0, micro_batch=micro, num_workers=0, world=1, rank=0)
    lengths: list[int] = []
    has_image: list[bool] = []
    streams: list[int] = []
    real = padded = dummy_batches = 0
    for batch in loader:
        mask = batch["attention_mask"]
        lengths += mask.sum(dim=1).tolist()
        # mm_token_type_ids marks image tokens; the dummy image's are masked, so only real images count.
        has_image += ((batch["mm_token_type_ids"] * mask).sum(dim=1) > 0).tolist()
        streams += batch["stream_index"].tolist()
        stats = batch["stats"]
        real += stats.real_tokens
        padded += stats.slots
        dummy_batches += stats.dummy_image
        if len(lengths) >= slots:
            break
    return {
        "lengths": lengths,
        "has_image": has_image,
        "streams": streams,
        "as_trained": real / padded,
        "text_only_batches": dummy_batches,
    }


def stage_report(data: Any, slots: int, micro: int, dummy_tokens: int) -> dict[str, Any]:
    began = time.perf_counter()
    measured = stage_lengths(data, slots, micro)
    lengths, has_image = measured["lengths"], measured["has_image"]
    everything = range(len(lengths))
    contiguous = [list(everything[start : start + micro]) for start in range(0, len(lengths), micro)]
    simulated = padded_fraction(lengths, has_image, contiguous, dummy_tokens)
    assert abs(simulated - measured["as_trained"]) < 1e-12, (simulated, measured["as_trained"])
    max_seq_len = data.recipe.model.max_seq_len
    schemes: dict[str, dict[str, Any]] = {
        "contiguous (what training gets)": {
            "with_dummy_image": simulated,
            "without_dummy_image": real_token_fraction(lengths, contiguous),
            "text_only_batches": measured["text_only_batches"],
        },
        f"max_seq_len ({max_seq_len})": {"with_dummy_image": sum(lengths) / (len(lengths) * max_seq_len)},
    }
    for group in GROUP_BATCHES:
        batches = length_grouped_batches(lengths, micro, group_batches=group, seed=data.stage.seed)
        name = f"length_grouped (group_batches={group}, window {micro * group})"
        schemes[name] = {
            "with_dummy_image": padded_fraction(lengths, has_image, batches, dummy_tokens),
            "without_dummy_image": real_token_fraction(lengths, batches),
            "text_only_batches": sum(1 for batch in batches if not any(has_image[i] for i in batch)),
        }
    ordered = sorted(everything, key=lambda index: -lengths[index])
    sorted_batches = [ordered[start : start + micro] for start in range(0, len(ordered), micro)]
    schemes["global_sort (bound; breaks the mixture)"] = {
        "with_dummy_image": padded_fraction(lengths, has_image, sorted_batches, dummy_tokens),
        "without_dummy_image": real_token_fraction(lengths, sorted_batches),
    }
    per_stream = {}
    for index, name in enumerate(data.stream_names):
        values = [length for length, stream in zip(lengths, measured["streams"], strict=True) if stream == index]
        per_stream[name] = {
            "samples": len(values),
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
        }
    return {
        "stage": data.stage.name,
        "streams": list(data.stream_names),
        "slots": len(lengths),
        "micro_batch": micro,
        "lengths": per_stream,
        "schemes": schemes,
        "seconds": time.perf_counter() - began,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Padding benchmark: real-token fraction on the demo mixture",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {machine_line(report)}",
        f"- date: {report['date']}",
        f"- code: rmpl_ds at {report['revision']}",
        f"- data: {report['data']}; every slot of each stage (steps × global batch) in slot-stream order",
        f"- a text-only micro-batch carries the dummy image: {report['dummy_image_tokens']} masked tokens appended "
        "to its shortest row",
        "",
        "Real tokens / padded slots (higher is better). Contiguous is what the training run gets: the loader "
        "hands out contiguous slots (the package has no length-grouping mode); its value is measured from the "
        f"loader's BatchStats and equals the simulation. Image targets in the {report['box_format']} box syntax "
        "(the recipe's tasks.box_format). Length grouping (a what-if here) keeps each window's sample set, so the "
        "mixture stays exact per window (8 × group_batches slots: with the demo's global batch 16, group_batches/2 "
        "optimizer steps), but no longer per step; it also gathers text-only samples into micro-batches that then "
        "carry the dummy image.",
        "",
    ]
    for stage in report["stages"]:
        lengths = ", ".join(
            f"{name} {info['mean']:.0f} ({info['min']}-{info['max']})" for name, info in stage["lengths"].items()
        )
        lines += [
            f"## {stage['stage']}: {stage['slots']} slots, micro-batch {stage['micro_batch']}",
            "",
            f"Tokens per sample, mean (min-max): {lengths}.",
            "",
            "| scheme | real-token fraction | without the dummy image | text-only micro-batches |",
            "|---|---:|---:|---:|",
        ]
        for name, values in stage["schemes"].items():
            without = values.get("without_dummy_image")
            text_only = values.get("text_only_batches")
            lines.append(
                f"| {name} | {values['with_dummy_image']:.3f} | "
                f"{'-' if without is None else f'{without:.3f}'} | {'-' if text_only is None else text_only} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first 20 steps of each stage")
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    from rmpl_ds.data import StageData

    with tempfile.TemporaryDirectory(prefix="bench-padding-") as scratch:
        demo = build_demo(Path(scratch))
        recipe = demo_recipe(demo)
        bundle = load_bundle(recipe)
        dummy_tokens = len(bundle.dummy_image_inputs()["input_ids"])
        stages = []
        for stage_name in args.stages:
            stage = recipe.stage(stage_name)
            data = StageData.build(recipe, stage, bundle)
            steps = 20 if args.quick else stage.steps
            row = stage_report(data, steps * stage.global_batch, stage.micro_batch, dummy_tokens)
            stages.append(row)
            print(json.dumps({"stage": stage_name, **{k: v["with_dummy_image"] for k, v in row["schemes"].items()}}))

    report = {
        "command": " ".join(["python", *sys.argv])
        if argv is None
        else "python bench/bench_padding.py " + " ".join(argv),
        "machine": machine("torch", "transformers", "numpy"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "data": demo.describe(),
        "dummy_image_tokens": dummy_tokens,
        "box_format": f"{recipe.tasks.box_format} ({bundle.box_syntax(recipe.tasks.box_format).name})",
        "stages": stages,
    }
    write_results(args.out, "padding", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
