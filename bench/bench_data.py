"""Benchmark: samples/s from demo shards to collated batches, our loader versus webdataset and HF ``datasets``.

Setup (in a temp dir, ~15 s): the demo set in its real raw formats (:func:`rmpl_ds.sources.demo.write_demo`,
512-px JPEGs), converted by the real converters into shard sets (:func:`rmpl_ds.commands.shards.build`), the tiny
Qwen2-VL (:func:`rmpl_ds.backbones.tiny.build_tiny`) and its processor bundle, and the stages of
``launch/recipes/demo.yaml`` pointed at them. Every pipeline ends in the same per-sample transform, exactly
``rmpl_ds.data.StageData``'s (record → ``rmpl_ds.tasks`` prompt → tiny-bundle encoding: tokens, labels, image
pixels), and the same collator (padding, dummy image, per-sample stream index and loss weight), in micro-batches of
8 through a ``torch.utils.data.DataLoader`` with the same worker count. They differ in how the records are read and
mixed:

* ``slot_stream``: ``StageData.loader`` (the training run's loader): random access by byte offset, the slot
  stream's exact ratios, per-source epoch permutations;
* ``webdataset``: one plain sequential ``webdataset.WebDataset`` reader per stream (raw members decoded by our
  whitelist ``rmpl_ds.shards.decode_member``, never webdataset's default decoders), mixed with the stage's weights
  by webdataset's ``RandomMix`` (i.i.d.): the cheapest way to stream the same mixture from these tars;
* ``hf_interleave``: HF ``datasets`` webdataset streaming per stream, ``interleave_datasets`` with the stage's
  probabilities (i.i.d.). Its records must share one schema to be interleaved, so each stream's ``json`` column
  is renamed ``json_<stream index>`` (a union schema, which also says which stream a row came from). Images are
  read as bytes (``Image(decode=False)``) and decoded by our whitelist: with HF's own decoding, the feature cast
  that ``rename_column`` / ``interleave_datasets`` apply re-encodes every decoded JPEG (lossy: 675829 of the
  1082880 pixel values of the first SWiG image change), so the model would not see the shard's pixels.

Before measuring, the script checks that the three readers see the same records: every record HF parses equals
our shard's, and the first sample of every stream renders and encodes to identical tensors through all three.

Throughput is steady state (from the first batch on): wall-clock samples/s (best of the interleaved repeats, as
this machine's 2 CPUs are shared) and CPU ms per sample (median; main process plus DataLoader workers), with
ratios to webdataset. The shards are cut at 50 samples (6 per source) so that the baselines' workers, which split
by shard, all get work; our loader does not care.

Usage: python bench/bench_data.py [--quick] [--samples 240] [--repeats 5] [--workers 0 2] [--size 300]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import cpu_model, revision, write_results

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "launch" / "recipes" / "demo.yaml"
MICRO = 8
DEMO_SIZE = 300
SHARD_SIZE = 50
# Shard sets the demo stages read: (source, converter, raw input, raw images) relative to the raw demo directory.
DEMO_SOURCES = (
    ("ace", "ace", "ace", None),
    ("swig", "swig", "swig/SWiG_jsons", "swig/images_512"),
    ("mnre", "mnre", "mnre/mnre_txt", "mnre/img_org"),
)


# -- shared by bench_data, bench_padding and bench_engine ---------------------------------------------------------


def machine(*packages: str) -> dict[str, Any]:
    """nproc, CPU model, Python and the versions of ``packages`` (those that import)."""
    import importlib

    model = cpu_model()
    versions = {}
    for package in packages:
        try:
            versions[package] = getattr(importlib.import_module(package), "__version__", "?")
        except ImportError:
            versions[package] = "not installed"
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "versions": versions}


def machine_line(report: dict[str, Any]) -> str:
    info = report["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    return f"{info['nproc']} CPUs (`nproc`), {info['cpu']}, Python {info['python']}, {versions}"


@dataclass(frozen=True)
class DemoSet:
    """The demo shard sets and the tiny model directory, built under ``root``."""

    root: Path
    shards: dict[str, Path]
    model: Path
    size: int
    shard_size: int

    def describe(self) -> str:
        return (
            f"demo set (write_demo seed 0, size {self.size}: JPEGs with a 512-px short side for SWiG, ~300×240 for "
            f"MNRE, resized to 512×512 by the bundle), converted by the real converters into shards of "
            f"{self.shard_size} samples (rmpl_ds.commands.shards.build); tiny Qwen2-VL (build_tiny seed 0)"
        )


def build_demo(root: Path, *, size: int = DEMO_SIZE, shard_size: int = SHARD_SIZE, seed: int = 0) -> DemoSet:
    """Write the demo raw data, convert it to shard sets with the real converters, and build the tiny Qwen2-VL."""
    import contextlib
    import io

    from rmpl_ds.backbones.tiny import build_tiny
    from rmpl_ds.commands.shards import build
    from rmpl_ds.sources.demo import write_demo

    raw = root / "raw"
    write_demo(raw, seed=seed, size=size)
    shards = {}
    for source, converter, input_path, images in DEMO_SOURCES:
        shards[source] = root / "shards" / source
        with contextlib.redirect_stdout(io.StringIO()):  # build prints one summary line per set
            code = build(
                converter,
                raw / input_path,
                out_dir=shards[source],
                images_dir=raw / images if images else None,
                shard_size=shard_size,
            )
        if code != 0:
            raise RuntimeError(f"no record of the demo {source} set converted")
    model = build_tiny("qwen2-vl", root / "tiny-qwen2-vl", seed=0)
    return DemoSet(root, shards, model, size, shard_size)


def demo_recipe(demo: DemoSet, overrides: Sequence[str] = (), world_size: int = 1) -> Any:
    """launch/recipes/demo.yaml with its model and sources pointed at ``demo``."""
    from rmpl_ds.config import load_recipe

    paths = [f"model.path={demo.model}"] + [f"sources.{name}={path}" for name, path in demo.shards.items()]
    return load_recipe(DEMO_RECIPE, [*paths, *overrides], world_size=world_size)


def load_bundle(recipe: Any) -> Any:
    """The recipe model's processor bundle, as the training run loads it (``load_model`` → ``adapter.load``)."""
    from rmpl_ds.backbones import get_adapter

    model = recipe.model
    return get_adapter(model.family).load_processor(
        model.path, image_size=model.image_size, max_image_tokens=model.max_image_tokens
    )


# -- the three pipelines ------------------------------------------------------------------------------------------


def tar_files(directory: Path) -> list[str]:
    return sorted(str(path) for path in directory.glob("*.tar"))


def stage_weights(data: Any) -> list[float]:
    total = sum(stream.weight for stream in data.stage.mixture)
    return [stream.weight / total for stream in data.stage.mixture]


def item_seed(seed: int, key: str) -> int:
    """A per-sample seed for the baselines (only the AR task draws from it), from the key instead of the slot."""
    from rmpl_ds.mixing import sample_seed

    return sample_seed(seed, zlib.crc32(key.encode()))


def slot_stream_loader(data: Any, workers: int) -> Iterable[dict[str, Any]]:
    return data.loader(next_slot=0, micro_batch=MICRO, num_workers=workers, world=1, rank=0)


def _wds_item(sample: dict[str, Any], *, stream: str, source: str, seed: int, transform: Callable) -> Any:
    from rmpl_ds.shards import decode_member

    key = sample["__key__"]
    members = {
        extension: decode_member(extension, value, name=f"{key}.{extension}")
        for extension, value in sample.items()
        if not extension.startswith("__")
    }
    item = {**members, "stream": stream, "source": source, "key": key, "sample_seed": item_seed(seed, key)}
    return transform(item)


def webdataset_loader(data: Any, workers: int) -> Iterable[dict[str, Any]]:
    import torch
    import webdataset as wds

    readers = []
    for stream in data.stage.mixture:
        # Repeating, so that a small stream does not end the mix; no decoder: raw bytes, decoded by our whitelist.
        reader = wds.WebDataset(
            tar_files(Path(data.shards[stream.name].directory)),
            shardshuffle=False,
            repeat=True,
            empty_check=False,
        )
        to_item = functools.partial(
            _wds_item, stream=stream.name, source=stream.source, seed=data.stage.seed, transform=data.renderer
        )
        readers.append(reader.map(to_item))
    mixed = wds.RandomMix(readers, probs=stage_weights(data))
    return torch.utils.data.DataLoader(
        mixed, batch_size=MICRO, num_workers=workers, collate_fn=data.collator, persistent_workers=workers > 0
    )


def _hf_item(row: dict[str, Any], *, stream_names: Sequence[str], sources: Sequence[str], seed: int) -> dict:
    from rmpl_ds.shards import decode_member

    index = next(i for i in range(len(stream_names)) if row.get(f"json_{i}") is not None)
    item = {
        "json": row[f"json_{index}"],
        "stream": stream_names[index],
        "source": sources[index],
        "key": row["__key__"],
        "sample_seed": item_seed(seed, row["__key__"]),
    }
    if row.get("jpg") is not None:
        item["jpg"] = decode_member("jpg", row["jpg"]["bytes"], name=f"{row['__key__']}.jpg")
    return item


def _hf_collate(rows: list[dict[str, Any]], *, to_item: Callable, transform: Callable, collator: Callable) -> Any:
    return collator([transform(to_item(row)) for row in rows])


def hf_streams(data: Any) -> list[Any]:
    """One HF webdataset stream per mixture stream, its ``json`` column renamed ``json_<index>`` and its images
    left as bytes (see the module docstring for why)."""
    import datasets

    datasets.disable_progress_bars()
    streams = []
    for index, stream in enumerate(data.stage.mixture):
        files = tar_files(Path(data.shards[stream.name].directory))
        dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
        if "jpg" in dataset.features:
            dataset = dataset.cast_column("jpg", datasets.Image(decode=False))
        streams.append(dataset.rename_column("json", f"json_{index}"))
    return streams


def hf_to_item(data: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return functools.partial(
        _hf_item,
        stream_names=data.stream_names,
        sources=[stream.source for stream in data.stage.mixture],
        seed=data.stage.seed,
    )


def hf_interleave_loader(data: Any, workers: int) -> Iterable[dict[str, Any]]:
    import datasets
    import torch

    mixed = datasets.interleave_datasets(
        hf_streams(data), probabilities=stage_weights(data), seed=data.stage.seed, stopping_strategy="all_exhausted"
    ).repeat(None)
    collate = functools.partial(_hf_collate, to_item=hf_to_item(data), transform=data.renderer, collator=data.collator)
    return torch.utils.data.DataLoader(
        mixed, batch_size=MICRO, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0
    )


PIPELINES: dict[str, Callable[[Any, int], Iterable[dict[str, Any]]]] = {
    "slot_stream": slot_stream_loader,
    "webdataset": webdataset_loader,
    "hf_interleave": hf_interleave_loader,
}


# -- same records, same transform -----------------------------------------------------------------------------------


def check_same_records(data: Any) -> dict[str, Any]:
    """Every record HF parses equals our shard's; the first sample of each stream encodes to identical tensors
    through the three readers. Raises AssertionError otherwise; returns what was checked."""
    import torch
    import webdataset as wds

    records_checked, sources_checked = 0, set()
    for index, (stream, hf_stream) in enumerate(zip(data.stage.mixture, hf_streams(data), strict=True)):
        shard_set = data.shards[stream.name]
        seed = item_seed(data.stage.seed, shard_set.key(0))
        base = {"stream": stream.name, "source": stream.source, "key": shard_set.key(0), "sample_seed": seed}
        ours = data.renderer({**shard_set.read(0), **base})
        raw = next(iter(wds.WebDataset(tar_files(Path(shard_set.directory))[:1], shardshuffle=False)))
        assert raw["__key__"] == shard_set.key(0), (raw["__key__"], shard_set.key(0))
        theirs = _wds_item(raw, stream=stream.name, source=stream.source, seed=data.stage.seed, transform=data.renderer)
        rows = iter(hf_stream)
        first = next(rows)
        hf_encoded = data.renderer(hf_to_item(data)(first))
        for name, other in (("webdataset", theirs), ("hf_interleave", hf_encoded)):
            for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
                if key in ours or key in other:
                    assert torch.equal(ours[key], other[key]), f"{stream.name}: {name} differs in {key}"
        if stream.source in sources_checked:
            continue
        sources_checked.add(stream.source)
        sample_id = -1
        for sample_id, row in enumerate([first, *rows]):
            assert row["__key__"] == shard_set.key(sample_id), (stream.name, sample_id)
            assert row[f"json_{index}"] == shard_set.read(sample_id)["json"], (stream.name, sample_id)
            records_checked += 1
        assert sample_id == len(shard_set) - 1, (stream.name, sample_id, len(shard_set))
    return {"records_equal": records_checked, "first_sample_tensors_equal": len(data.stage.mixture)}


# -- measurement ----------------------------------------------------------------------------------------------------


def _cpu_seconds(batches: object) -> float:
    """CPU time (user + system) of this process and of the loader's worker processes so far (Linux /proc)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for worker in getattr(batches, "_workers", []):
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)
    return total


def measure(pipeline: str, data: Any, workers: int, samples: int) -> dict[str, Any]:
    """Steady state from the first batch on: wall-clock samples/s and CPU ms per sample (all processes) over the
    next ``samples`` samples, and the stream counts seen."""
    started = time.perf_counter()
    loader = PIPELINES[pipeline](data, workers)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    cpu_first = _cpu_seconds(batches)
    seen = 0
    counts = [0] * len(data.stream_names)
    while seen < samples:
        batch = next(batches)
        seen += len(batch["stream_index"])
        for index in batch["stream_index"].tolist():
            counts[index] += 1
    elapsed = time.perf_counter() - first
    cpu = _cpu_seconds(batches) - cpu_first
    del batches, loader
    return {
        "first_batch_s": first - started,
        "samples_per_s": seen / elapsed,
        "cpu_ms_per_sample": 1000 * cpu / seen,
        "stream_counts": counts,
    }


def run_stage(data: Any, workers: int, samples: int, repeats: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name in PIPELINES}
    cpu: dict[str, list[float]] = {name: [] for name in PIPELINES}
    first: dict[str, list[float]] = {name: [] for name in PIPELINES}
    counts: dict[str, list[int]] = {}
    for repeat in range(repeats):
        names = list(PIPELINES)
        for pipeline in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order
            result = measure(pipeline, data, workers, samples)
            rates[pipeline].append(result["samples_per_s"])
            cpu[pipeline].append(result["cpu_ms_per_sample"])
            first[pipeline].append(result["first_batch_s"])
            counts[pipeline] = result["stream_counts"]
    row: dict[str, Any] = {"stage": data.stage.name, "streams": list(data.stream_names), "workers": workers}
    for pipeline in PIPELINES:
        row[pipeline] = {
            "samples_per_s_best": max(rates[pipeline]),
            "samples_per_s_median": statistics.median(rates[pipeline]),
            "samples_per_s_all": rates[pipeline],
            "cpu_ms_per_sample_median": statistics.median(cpu[pipeline]),
            "cpu_ms_per_sample_all": cpu[pipeline],
            "first_batch_s_median": statistics.median(first[pipeline]),
            "stream_counts_last_repeat": counts[pipeline],
        }
    for pipeline in ("slot_stream", "hf_interleave"):
        row[f"{pipeline}_vs_webdataset"] = {
            "throughput": row[pipeline]["samples_per_s_best"] / row["webdataset"]["samples_per_s_best"],
            "cpu_per_sample": row[pipeline]["cpu_ms_per_sample_median"] / row["webdataset"]["cpu_ms_per_sample_median"],
        }
    return row


def markdown(report: dict[str, Any]) -> str:
    names = list(PIPELINES)
    lines = [
        "# Data benchmark: shards → rendered, encoded, collated batches",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {machine_line(report)}",
        f"- date: {report['date']}",
        f"- code: rmpl_ds at {report['revision']}",
        f"- data: {report['data']}",
        f"- transform: StageData's (rmpl_ds.tasks render → tiny Qwen2-VL bundle encode) + StageCollator, micro-batch "
        f"{MICRO}; {report['samples']} samples per measurement after the first batch; {report['repeats']} "
        f"interleaved repeats (order rotated); {report['threads']} torch thread in the main process, 1 per worker",
        f"- same records: {report['check']['records_equal']} HF records equal to our shards'; the first sample of "
        f"every stream encodes to identical tensors through all three readers",
        "",
        "Samples/s: best repeat (wall clock, steady state). CPU: median ms of CPU time per sample, main process plus "
        "DataLoader workers (what contention on this shared machine disturbs least). Ratios are to webdataset "
        "(throughput: higher is better; CPU: lower is better).",
        "",
        "| stage (streams) | workers | samples/s slot_stream / webdataset / hf_interleave | throughput ratio "
        "slot_stream (hf) | CPU ms/sample slot_stream / webdataset / hf_interleave | CPU ratio slot_stream (hf) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["throughput"]:
        rates = " / ".join(f"{row[name]['samples_per_s_best']:.1f}" for name in names)
        cpus = " / ".join(f"{row[name]['cpu_ms_per_sample_median']:.2f}" for name in names)
        ours, hf = row["slot_stream_vs_webdataset"], row["hf_interleave_vs_webdataset"]
        lines.append(
            f"| {row['stage']} ({', '.join(row['streams'])}) | {row['workers']} | {rates} | "
            f"{ours['throughput']:.2f} ({hf['throughput']:.2f}) | {cpus} | "
            f"{ours['cpu_per_sample']:.2f} ({hf['cpu_per_sample']:.2f}) |"
        )
    lines += [
        "",
        "Samples per stream in the last repeat (slot_stream / webdataset / hf_interleave): the exact ratios against "
        "i.i.d. draws, whose mix (and so the image share and the cost per sample) varies from run to run:",
        "",
    ]
    for row in report["throughput"]:
        counts = " / ".join("-".join(map(str, row[name]["stream_counts_last_repeat"])) for name in names)
        lines.append(f"- {row['stage']}, {row['workers']} workers: {counts}")
    lines += [
        "",
        "Where the time goes: per sample, the transform (prompt rendering, tokenization, the Qwen2-VL image "
        f"processor on the image resized to 512×512) costs {report['transform_ms_per_sample']['mean']:.2f} ms of "
        "CPU on its own (mean over Stage I's first "
        f"{report['transform_ms_per_sample']['samples']} slots, read once, transform timed alone), so the readers "
        "differ in what remains: reading, decoding and mixing.",
    ]
    return "\n".join(lines) + "\n"


def transform_cost(data: Any, samples: int) -> dict[str, float]:
    """CPU ms of the transform alone, per sample, on already decoded items (reading excluded)."""
    from rmpl_ds.loader import SlotDataset

    items = SlotDataset(data.stream, data.shards)
    decoded = [items[slot] for slot in range(samples)]
    costs = []
    for item in decoded:
        began = time.process_time()
        data.renderer(item)
        costs.append(1000 * (time.process_time() - began))
    return {"median": statistics.median(costs), "mean": statistics.fmean(costs), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Stage I only, 0 workers, 80 samples, 1 repeat")
    parser.add_argument("--samples", type=int, default=240, help="samples per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--size", type=int, default=DEMO_SIZE, help="demo records per source")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.workers, args.stages = 80, 1, [0], ["stage1"]

    import torch

    from rmpl_ds.data import StageData

    # DataLoader workers run one torch thread each; the main process does the same, so that with 0 workers the CPU
    # time is not inflated by a second thread spinning on this shared machine.
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        demo = build_demo(Path(scratch), size=args.size)
        recipe = demo_recipe(demo)
        bundle = load_bundle(recipe)
        throughput, checks, transform = [], {"records_equal": 0, "first_sample_tensors_equal": 0}, None
        for stage_name in args.stages:
            data = StageData.build(recipe, recipe.stage(stage_name), bundle)
            for key, value in check_same_records(data).items():
                checks[key] += value
            if transform is None:
                transform = transform_cost(data, min(args.samples, 160))
            for workers in args.workers:
                row = run_stage(data, workers, args.samples, args.repeats)
                throughput.append(row)
                print(
                    json.dumps(
                        {k: v for k, v in row.items() if not isinstance(v, dict)}
                        | {name: round(row[name]["samples_per_s_best"], 1) for name in PIPELINES}
                    ),
                    flush=True,
                )

    report = {
        "command": " ".join(["python", *sys.argv]) if argv is None else "python bench/bench_data.py " + " ".join(argv),
        "machine": machine("torch", "transformers", "webdataset", "datasets", "PIL", "numpy"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "data": demo.describe(),
        "samples": args.samples,
        "repeats": args.repeats,
        "check": checks,
        "threads": args.threads,
        "transform_ms_per_sample": transform,
        "throughput": throughput,
    }
    write_results(args.out, "data", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
