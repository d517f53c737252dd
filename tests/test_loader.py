"""The loader over real tar shards: decoded samples with slot metadata, layout-independent augmentation RNG,
resume equality across world sizes 1/2/4 and worker counts 0/1/3, source-epoch bijections gathered over ranks and
workers, no run-out, and refusal of a resume onto different shards."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rmpl_ds.errors import UserError
from rmpl_ds.images import encode_image
from rmpl_ds.loader import RankBatchSampler, SlotDataset, build_loader, build_stream
from rmpl_ds.mixing import SlotStream, sample_seed
from rmpl_ds.shards import ShardSample, ShardSet, write_shards

SIZES = {"ace": 13, "swig": 20, "mnre": 7}
MIXTURE = [("ace", 1.0), ("swig", 1.0), ("mnre", 2.0)]
SEED = 1234

# The tests use 3 workers on purpose (the resume must not depend on the worker count); torch warns that this
# machine suggests at most 2.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _samples(source: str, count: int, with_image: bool) -> list[ShardSample]:
    samples = []
    for index in range(count):
        members = {"json": json.dumps({"source": source, "index": index}).encode()}
        if with_image:
            pixels = np.full((6, 8, 3), (index * 11) % 256, dtype=np.uint8)
            members["png"] = encode_image(Image.fromarray(pixels), "png")
        samples.append(ShardSample(f"{source}{index:05d}", members))
    return samples


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    dirs = {}
    for source, count in SIZES.items():
        dirs[source] = root / source
        write_shards(_samples(source, count, with_image=source != "ace"), dirs[source], source=source, shard_size=5)
    return dirs


def _open(shard_dirs: dict[str, Path]) -> dict[str, ShardSet]:
    return {source: ShardSet.open(path) for source, path in shard_dirs.items()}


def _dataset(shard_dirs: dict[str, Path], **kwargs: Any) -> SlotDataset:
    shards = _open(shard_dirs)
    return SlotDataset(build_stream(MIXTURE, shards, seed=SEED), shards, **kwargs)


def _summary(item: dict[str, Any]) -> tuple[Any, ...]:
    """What a test compares: the slot, where it read from, and the first draw of its augmentation RNG."""
    augmentation = np.random.default_rng(item["sample_seed"])
    return (item["slot"], item["stream"], item["sample_id"], item["source_epoch"], float(augmentation.random()))


def test_item_is_the_decoded_sample_with_its_slot_metadata(shard_dirs: dict[str, Path]) -> None:
    dataset = _dataset(shard_dirs)
    for slot in range(12):
        item = dataset[slot]
        ref = dataset.stream.resolve(slot)
        assert (item["stream"], item["sample_id"], item["source_epoch"], item["slot"]) == (
            ref.stream,
            ref.sample_id,
            ref.source_epoch,
            slot,
        )
        assert item["json"] == {"source": ref.stream, "index": ref.sample_id}
        assert item["key"] == f"{ref.stream}{ref.sample_id:05d}" and item["source"] == ref.stream
        if ref.stream != "ace":
            assert isinstance(item["png"], Image.Image) and item["png"].mode == "RGB"
            assert item["png"].getpixel((0, 0))[0] == (ref.sample_id * 11) % 256
    # The 1:1:2 schedule in every window of 4: one ace, one swig, two mnre.
    assert [dataset[slot]["stream"] for slot in range(4)] == ["ace", "mnre", "swig", "mnre"]
    raw = _dataset(shard_dirs, decode=False)[1]
    assert isinstance(raw["json"], bytes) and isinstance(raw["png"], bytes)


def test_sample_seed_depends_only_on_seed_and_slot(shard_dirs: dict[str, Path]) -> None:
    first, second = _dataset(shard_dirs), _dataset(shard_dirs)
    seeds = [first[slot]["sample_seed"] for slot in range(6)]
    assert seeds == [second[slot]["sample_seed"] for slot in reversed(range(6))][::-1]
    assert seeds == [sample_seed(SEED, slot) for slot in range(6)] and len(set(seeds)) == 6


def _loader_items(
    shard_dirs: dict[str, Path],
    next_slot: int,
    steps: int,
    global_batch: int,
    world: int,
    workers: int,
    stream: SlotStream | None = None,
) -> list[list[tuple[Any, ...]]]:
    """Per optimizer step, the sorted summaries of every item all ranks loaded (each rank its own DataLoader), over
    ``stream`` (a resumed one), or a fresh stream of the mixture."""
    shards = _open(shard_dirs)
    dataset = SlotDataset(stream or build_stream(MIXTURE, shards, seed=SEED), shards, transform=_summary)
    micro = global_batch // (world * 2)  # two accumulation steps
    per_step: list[list[tuple[Any, ...]]] = [[] for _ in range(steps)]
    for rank in range(world):
        loader = build_loader(
            dataset,
            next_slot=next_slot,
            global_batch=global_batch,
            micro=micro,
            world=world,
            rank=rank,
            num_workers=workers,
        )
        batches = iter(loader)
        for step in range(steps):
            for _ in range(2):
                per_step[step] += next(batches)
        del batches, loader
    return [sorted(items) for items in per_step]


GLOBAL_BATCH, STEPS = 8, 6


@pytest.fixture(scope="module")
def uninterrupted(shard_dirs: dict[str, Path]) -> list[list[tuple[Any, ...]]]:
    return _loader_items(shard_dirs, 0, STEPS, GLOBAL_BATCH, world=2, workers=2)


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_resume_gives_the_uninterrupted_batches_for_any_world_and_workers(
    shard_dirs: dict[str, Path], uninterrupted: list[list[tuple[Any, ...]]], world: int, workers: int
) -> None:
    global_batch, steps, interrupted_at = GLOBAL_BATCH, STEPS, 3
    # Save the sampler state at the step boundary, round-trip it through JSON like a checkpoint's client state.
    stream = _dataset(shard_dirs).stream
    state = json.loads(json.dumps(stream.state(interrupted_at * global_batch)))
    resumed_stream, next_slot = build_stream(MIXTURE, _open(shard_dirs), seed=SEED).resume(state)
    assert next_slot == interrupted_at * global_batch
    # The loaders read through the resumed stream (what the stage runner does): its per-source draws and
    # source-epochs must continue, not restart at the resumed slot.
    resumed = _loader_items(
        shard_dirs, next_slot, steps - interrupted_at, global_batch, world, workers, stream=resumed_stream
    )
    assert resumed == uninterrupted[interrupted_at:]


def test_source_epochs_are_bijections_across_ranks_and_workers(shard_dirs: dict[str, Path]) -> None:
    dataset = _dataset(shard_dirs, transform=_summary)
    stream = dataset.stream
    end = stream.epoch_end_slot("swig", 3)
    global_batch = 8
    steps = -(-end // global_batch)
    seen: dict[tuple[str, int], list[int]] = {}
    for rank in range(2):
        loader = build_loader(
            dataset, next_slot=0, global_batch=global_batch, micro=2, world=2, rank=rank, num_workers=3
        )
        for batch in itertools.islice(loader, steps * 2):
            for _slot, name, sample_id, epoch, _draw in batch:
                seen.setdefault((name, epoch), []).append(sample_id)
    draws = dict(zip(stream.names, stream.draws_before(steps * global_batch), strict=True))
    complete = [(name, epoch) for name, epoch in seen if (epoch + 1) * SIZES[name] <= draws[name]]
    assert {name for name, _ in complete} == set(SIZES) and len(complete) >= 3 + 3 + 3
    for name, epoch in complete:
        assert sorted(seen[name, epoch]) == list(range(SIZES[name]))


def test_no_rank_runs_out_over_ten_epochs_of_the_smallest_source(shard_dirs: dict[str, Path]) -> None:
    dataset = _dataset(shard_dirs, transform=lambda item: item["stream"])
    end = dataset.stream.epoch_end_slot("mnre", 10)
    global_batch = 8
    micro_batches = -(-end // global_batch) * 2  # world 2, micro 2, accumulation 2: two micro-batches per step
    counts = []
    for rank in range(2):
        loader = build_loader(dataset, next_slot=0, global_batch=global_batch, micro=2, world=2, rank=rank)
        counts.append(sum(1 for _ in itertools.islice(loader, micro_batches)))
    assert counts == [micro_batches, micro_batches]
    assert dataset.stream.epochs_at(micro_batches * 4)["mnre"] >= 10


def test_loader_options(shard_dirs: dict[str, Path]) -> None:
    dataset = _dataset(shard_dirs)
    loader = build_loader(dataset, next_slot=16, global_batch=8, micro=2, world=2, rank=1, num_workers=1)
    assert loader.persistent_workers and not loader.pin_memory and loader.in_order
    assert isinstance(loader.batch_sampler, RankBatchSampler)
    assert [item["slot"] for item in next(iter(loader))] == [18, 19]
    assert loader.batch_sampler.next_slot_after(3) == 16 + 3 * 8
    no_workers = build_loader(dataset, next_slot=0, global_batch=8, micro=4, world=1, rank=0, collate_fn=len)
    assert not no_workers.persistent_workers and next(iter(no_workers)) == 4
    with pytest.raises(UserError, match="not divisible"):
        build_loader(dataset, next_slot=0, global_batch=8, micro=3, world=2, rank=0)


def _mark_worker(worker_id: int) -> None:
    os.environ["RMPL_TEST_WORKER"] = str(worker_id)


def _worker_mark(item: dict[str, Any]) -> str | None:
    return os.environ.get("RMPL_TEST_WORKER")


def test_worker_init_fn_runs_in_each_worker(shard_dirs: dict[str, Path]) -> None:
    dataset = _dataset(shard_dirs, transform=_worker_mark)
    loader = build_loader(
        dataset, next_slot=0, global_batch=4, micro=2, world=1, rank=0, num_workers=2, worker_init_fn=_mark_worker
    )
    assert list(itertools.islice(loader, 4)) == [["0", "0"], ["1", "1"], ["0", "0"], ["1", "1"]]
    assert "RMPL_TEST_WORKER" not in os.environ


def test_resume_onto_different_shards_is_refused(shard_dirs: dict[str, Path], tmp_path: Path) -> None:
    state = _dataset(shard_dirs).stream.state(64)
    rebuilt = dict(shard_dirs)
    rebuilt["mnre"] = tmp_path / "mnre"
    write_shards(_samples("mnre", SIZES["mnre"], with_image=False), rebuilt["mnre"], source="mnre", shard_size=5)
    stream = build_stream(MIXTURE, _open(rebuilt), seed=SEED)
    with pytest.raises(UserError, match=r"streams\.mnre\.shards"):
        stream.resume(state)


def test_mismatched_or_missing_shard_sets_are_user_errors(shard_dirs: dict[str, Path]) -> None:
    shards = _open(shard_dirs)
    with pytest.raises(UserError, match=r"no shard set for stream\(s\) \['m2e2'\]"):
        build_stream([*MIXTURE, ("m2e2", 1.0)], shards, seed=SEED)
    wrong = build_stream([("ace", 1.0), ("swig", 1.0)], {"ace": shards["ace"], "swig": shards["mnre"]}, seed=SEED)
    with pytest.raises(UserError, match="the sampler expects 7 samples"):
        SlotDataset(wrong, {"ace": shards["ace"], "swig": shards["swig"]})


def test_two_streams_of_one_source_share_its_shard_set(shard_dirs: dict[str, Path]) -> None:
    ace = ShardSet.open(shard_dirs["ace"])
    stream = build_stream([("ace:EM", 1.0), ("ace:AR", 1.0)], {"ace:EM": ace, "ace:AR": ace}, seed=SEED)
    dataset = SlotDataset(stream, {"ace:EM": ace, "ace:AR": ace})
    items = [dataset[slot] for slot in range(2 * SIZES["ace"])]
    for name in ("ace:EM", "ace:AR"):
        assert sorted(item["sample_id"] for item in items if item["stream"] == name) == list(range(SIZES["ace"]))
        assert {item["source"] for item in items if item["stream"] == name} == {"ace"}
