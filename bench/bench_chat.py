"""Benchmark: chat shard sets (``--source chat``) against the RMPL sources, in size and in loader throughput.

One demo set (``rmpl_ds.sources.demo.write_demo``: synthetic data in the real raw formats, the chat conversations in
its three chat layouts) is converted by the real converters; per source the benchmark reports

* size: samples, tar bytes per sample, of them JSON and image bytes, images per sample;
* loader throughput, two paths, each a single-stream :class:`rmpl_ds.loader.SlotDataset` read slot by slot in the
  main process (the work one DataLoader worker does per sample):
  * ``decode``: read the sample by byte offset and decode its members (JSON, JPEG/PNG to RGB pixels);
  * ``train item``: decode, then render and encode it for training (rmpl_ds.data.Renderer with the tiny Qwen2-VL's
    processor: the RMPL task or, for chat, the whole conversation in the chat template with its label mask), the
    work a training step's loader does; tokens per sample are reported beside it.

Rounds interleave the sources (the order rotates per round) and repeat; samples/s is the median over rounds, and
the ratio chat / RMPL source is taken per round (paired) and given as median [min, max].

Usage: python bench/bench_chat.py [--size 200] [--samples 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_model, revision, spread, spread_cell, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# source -> the task its stream trains in the Stage II mixture of launch/recipes/demo_chat.yaml (MNRE: Stage I's r)
TASKS = {"ace": "EM", "swig": "EM", "mnre": "r", "chat": "chat"}
FAMILY = "qwen2-vl"
MAX_SEQ_LEN = 1024


def build_sets(root: Path, size: int) -> dict[str, Path]:
    """Demo raw data and its shard sets, built by the real converters."""
    import contextlib
    import io

    from rmpl_ds.commands.shards import build
    from rmpl_ds.sources.demo import write_demo

    raw = root / "raw"
    write_demo(raw, seed=0, size=size)
    inputs = {
        "ace": (raw / "ace", None),
        "swig": (raw / "swig" / "SWiG_jsons", raw / "swig" / "images_512"),
        "mnre": (raw / "mnre" / "mnre_txt", raw / "mnre" / "img_org"),
        "chat": (raw / "chat", None),
    }
    sets = {}
    for source, (input_path, images) in inputs.items():
        out = root / "shards" / source
        with contextlib.redirect_stdout(io.StringIO()):
            build(source, input_path, out_dir=out, images_dir=images)
        sets[source] = out
    return sets


def size_row(directory: Path) -> dict[str, Any]:
    """Bytes per sample of a shard set, split into the JSON and image members (read from the tars)."""
    import tarfile

    from rmpl_ds.shards import read_manifest

    manifest = read_manifest(directory)
    json_bytes = image_bytes = images = 0
    tar_bytes = 0
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        tar_bytes += path.stat().st_size
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    json_bytes += member.size
                elif member.name.endswith((".jpg", ".png")):
                    image_bytes += member.size
                    images += 1
    samples = manifest["samples"]
    return {
        "samples": samples,
        "tar_bytes_per_sample": tar_bytes / samples,
        "json_bytes_per_sample": json_bytes / samples,
        "image_bytes_per_sample": image_bytes / samples,
        "images_per_sample": images / samples,
    }


def measure(dataset: Any, samples: int, start: int) -> tuple[float, list[Any]]:
    """Samples/s of ``dataset[start:start + samples]`` (wall clock) and the items."""
    began = time.perf_counter()
    items = [dataset[slot] for slot in range(start, start + samples)]
    return samples / (time.perf_counter() - began), items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200, help="write_demo size (records per RMPL source)")
    parser.add_argument("--samples", type=int, default=300, help="samples per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import torch

    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.backbones.tiny import build_tiny
    from rmpl_ds.data import Renderer
    from rmpl_ds.grounding import PLAIN
    from rmpl_ds.loader import SlotDataset, build_stream
    from rmpl_ds.shards import ShardSet

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = build_sets(root, args.size)
        sizes = {source: size_row(directory) for source, directory in sets.items()}
        model = build_tiny(FAMILY, root / "model", seed=0)
        bundle = get_adapter(FAMILY).load_processor(model)
        opened = {source: ShardSet.open(directory) for source, directory in sets.items()}
        datasets: dict[str, dict[str, SlotDataset]] = {}
        for source, shards in opened.items():
            name = f"{source}:{TASKS[source]}"
            stream = build_stream([(name, 1.0)], {name: shards}, seed=0)
            renderer = Renderer(
                bundle=bundle,
                tasks=(TASKS[source],),
                loss_weights=(1.0,),
                stream_index={name: 0},
                max_seq_len=MAX_SEQ_LEN,
                boxes=PLAIN,
            )
            datasets[source] = {
                "decode": SlotDataset(stream, {name: shards}),
                "train item": SlotDataset(stream, {name: shards}, transform=renderer),
            }
        sources = list(datasets)
        rates: dict[str, dict[str, list[float]]] = {path: {s: [] for s in sources} for path in ("decode", "train item")}
        tokens: dict[str, list[int]] = {source: [] for source in sources}
        labelled: dict[str, list[int]] = {source: [] for source in sources}
        for round_number in range(args.rounds):
            order = sources[round_number % len(sources) :] + sources[: round_number % len(sources)]
            for source in order:
                start = round_number * args.samples
                for path in ("decode", "train item"):
                    rate, items = measure(datasets[source][path], args.samples, start)
                    rates[path][source].append(rate)
                    if path == "train item" and round_number == 0:
                        tokens[source] = [int(item["length"]) for item in items]
                        labelled[source] = [int((item["labels"] != -100).sum()) for item in items]
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
        for shards in opened.values():
            shards.close()

    throughput = {
        path: {
            source: {
                "median_samples_per_s": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "chat_ratio": None
                if source == "chat"
                else spread([c / r for c, r in zip(per_source["chat"], values, strict=True)]),
            }
            for source, values in per_source.items()
        }
        for path, per_source in rates.items()
    }
    report = {
        "benchmark": "chat shard sets vs the RMPL sources: size and loader throughput",
        "command": "python bench/bench_chat.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "settings": {
            "demo_size": args.size,
            "samples": args.samples,
            "rounds": args.rounds,
            "family": FAMILY,
            "max_seq_len": MAX_SEQ_LEN,
            "tasks": TASKS,
            "threads": 1,
        },
        "size": sizes,
        "throughput": throughput,
        "tokens": {
            source: {"median": statistics.median(values), "max": max(values)} for source, values in tokens.items()
        },
        "labelled_tokens": {
            source: {"median": statistics.median(values), "max": max(values)} for source, values in labelled.items()
        },
    }
    write_results(args.out, "chat", report, render)


def render(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        "# Chat shard sets vs the RMPL sources",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']['nproc']} CPUs, {report['machine']['cpu']}, "
        f"Python {report['machine']['python']}",
        f"- date: {report['date']}; revision {report['revision']}",
        f"- data: `write_demo(seed=0, size={settings['demo_size']})` converted by the real converters (chat: its "
        "LLaVA, ShareGPT and OpenAI-messages files)",
        f"- throughput: {settings['samples']} samples per measurement, single-stream SlotDataset read slot by slot in "
        f"one process ({settings['threads']} torch thread), {settings['rounds']} interleaved rounds; the train item "
        f"path renders for the tiny {settings['family']} (max_seq_len {settings['max_seq_len']}) with the tasks "
        + ", ".join(f"{s} {t}" for s, t in settings["tasks"].items()),
        "",
        "## Size",
        "",
        "| source | samples | tar bytes / sample | JSON bytes / sample | image bytes / sample | images / sample |",
        "|---|---|---|---|---|---|",
    ]
    for source, row in report["size"].items():
        lines.append(
            f"| {source} | {row['samples']} | {row['tar_bytes_per_sample']:.0f} | {row['json_bytes_per_sample']:.0f} "
            f"| {row['image_bytes_per_sample']:.0f} | {row['images_per_sample']:.2f} |"
        )
    lines += [
        "",
        "## Loader throughput",
        "",
        "Samples/s: median over rounds [min, max]. chat / source: the per-round ratio of chat's samples/s to the "
        "source's, median [min, max] (above 1: chat is faster).",
        "",
        "| source | decode samples/s | chat / source | train item samples/s | chat / source | tokens / sample "
        "(median, max) | labelled tokens (median, max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for source in report["size"]:
        decode = report["throughput"]["decode"][source]
        item = report["throughput"]["train item"][source]
        tokens = report["tokens"][source]
        labelled = report["labelled_tokens"][source]
        lines.append(
            f"| {source} | {decode['median_samples_per_s']:.0f} [{decode['min']:.0f}, {decode['max']:.0f}] | "
            f"{spread_cell(decode['chat_ratio'], '-')} | {item['median_samples_per_s']:.0f} [{item['min']:.0f}, "
            f"{item['max']:.0f}] | {spread_cell(item['chat_ratio'], '-')} | {tokens['median']:g}, {tokens['max']} | "
            f"{labelled['median']:g}, {labelled['max']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
