"""The data loader: a map-style dataset over global slots, a per-rank batch sampler, and DataLoader workers.

The sampling decisions are all in :mod:`rmpl_ds.mixing`; this module only does the I/O around them:

* :class:`SlotDataset` ``[slot]`` resolves the slot to (stream, source-epoch, sample id), reads that sample from the
  stream's :class:`~rmpl_ds.shards.ShardSet` (one ``os.pread`` per member on a descriptor cached per shard per
  worker), decodes it through the shard whitelist, attaches a per-sample seed derived from ``(seed, slot)``, and
  applies the caller's ``transform`` (rendering and tokenization live elsewhere).
* :class:`RankBatchSampler` yields this rank's contiguous micro-batches of slots, forever, from ``next_slot``.
* :func:`build_loader` wires them into a ``torch.utils.data.DataLoader``. The DataLoader hands whole batches to
  workers round-robin and returns them in order, so what a rank sees does not depend on ``num_workers``,
  ``prefetch_factor`` or worker speed, and workers hold no sampling state.

There is no epoch end, no padding and no ``drop_last``: every rank consumes ``micro × accumulation`` slots per step
for as long as the loop asks. The resumable state is the stream's ``state(next_slot)``, kept by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rmpl_ds import dist
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger
from rmpl_ds.mixing import PhaseWeights, SlotStream, accumulation_steps, rank_batches, sample_seed
from rmpl_ds.shards import ShardSet

log = get_logger(__name__)


def build_stream(
    mixture: Sequence[tuple[str, float]],
    shards: Mapping[str, ShardSet],
    seed: int,
    phases: Sequence[tuple[int, PhaseWeights]] | None = None,
    tolerance: float | None = None,
) -> SlotStream:
    """The :class:`SlotStream` of a mixture whose streams read the given shard sets.

    Args:
        mixture: ``(stream name, weight)`` per stream, e.g. ``[("ace:EM", 1), ("swig:EM", 1), ("ace:AR", 1)]``.
        shards: stream name → its source's shard set (streams of one source may share one ``ShardSet``).
        seed, phases, tolerance: see :class:`SlotStream`.

    Each stream's size is its shard set's sample count and its shard fingerprint enters the state fingerprint, so
    resuming on rebuilt or different shards is refused.

    Raises:
        UserError: a stream without a shard set, an empty shard set, or an invalid mixture.
    """
    missing = [name for name, _ in mixture if name not in shards]
    if missing:
        raise UserError(f"data mixture: no shard set for stream(s) {missing}; have {sorted(shards)}")
    empty = [name for name, _ in mixture if len(shards[name]) == 0]
    if empty:
        raise UserError(
            "data mixture: the shard sets of "
            + ", ".join(f"{name} ({shards[name].directory})" for name in empty)
            + " hold no samples"
        )
    fingerprints: dict[ShardSet, str] = {}
    return SlotStream(
        [(name, weight, len(shards[name])) for name, weight in mixture],
        seed=seed,
        phases=phases,
        shard_hashes={name: fingerprints.setdefault(shards[name], shards[name].fingerprint()) for name, _ in mixture},
        tolerance=tolerance,
    )


def _identity(item: dict[str, Any]) -> dict[str, Any]:
    return item


def collate_list(batch: list[Any]) -> list[Any]:
    """Keep a micro-batch as the list of transformed samples (the default; a backbone's collate pads and stacks)."""
    return batch


class SlotDataset(Dataset):
    """Map-style dataset indexed by global slot (any int ≥ the stream's origin; there is no length).

    ``dataset[slot]`` is ``transform(item)`` where ``item`` holds the sample's decoded members (``"json"`` → object,
    ``"jpg"``/``"png"`` → RGB ``PIL.Image``, ...) plus ``stream`` (stream name), ``source`` (the shard set's
    source), ``key`` (WebDataset key), ``source_epoch``, ``sample_id``, ``slot`` and ``sample_seed``, a 64-bit
    seed that depends only on ``(seed, slot)``: draw any per-sample randomness from
    ``numpy.random.default_rng(item["sample_seed"])`` (= :func:`rmpl_ds.mixing.augmentation_rng`), never from the
    worker's RNG. With ``decode=False`` the members stay bytes.

    Args:
        stream: the slot stream (see :func:`build_stream`); its sizes must match the shard sets.
        shards: stream name → shard set.
        transform: applied in the worker to each item; identity by default. Must be picklable if workers are
            spawned rather than forked.
        decode: decode members through the shard whitelist (True) or return their bytes.

    Raises:
        UserError: a stream without a shard set, or a shard set whose size differs from the stream's.
    """

    def __init__(
        self,
        stream: SlotStream,
        shards: Mapping[str, ShardSet],
        transform: Callable[[dict[str, Any]], Any] | None = None,
        decode: bool = True,
    ) -> None:
        problems = []
        for name, size in zip(stream.names, stream.sizes, strict=True):
            if name not in shards:
                problems.append(f"stream {name!r}: no shard set")
            elif len(shards[name]) != size:
                problems.append(
                    f"stream {name!r}: the sampler expects {size} samples, {shards[name].directory} holds "
                    f"{len(shards[name])}"
                )
        if problems:
            raise UserError("slot dataset: " + "; ".join(problems))
        self.stream = stream
        self.shards: tuple[ShardSet, ...] = tuple(shards[name] for name in stream.names)
        self.transform = transform or _identity
        self.decode = decode

    def __getitem__(self, slot: int) -> Any:
        ref = self.stream.resolve(slot)
        shard_set = self.shards[ref.stream_index]
        members: dict[str, Any] = shard_set.read(ref.sample_id) if self.decode else shard_set.read_raw(ref.sample_id)
        item = {
            **members,
            "stream": ref.stream,
            "source": shard_set.source,
            "key": shard_set.key(ref.sample_id),
            "source_epoch": ref.source_epoch,
            "sample_id": ref.sample_id,
            "slot": slot,
            "sample_seed": sample_seed(self.stream.seed, slot),
        }
        return self.transform(item)


class RankBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of slots, forever: at optimizer step ``t`` (counted from ``next_slot``) and
    micro-step ``m``, the contiguous slots ``next_slot + t·G + (m·W + rank)·micro + [0, micro)``.

    Every ``iter()`` starts again at ``next_slot``; a training loop keeps one iterator for the whole run, and a
    resume builds a new sampler from the saved ``next_slot``. There is no ``__len__``: the stream is infinite.

    Raises:
        UserError: ``global_batch`` not divisible by ``world × micro``; ValueError: rank outside the world.
    """

    def __init__(self, next_slot: int, global_batch: int, world: int, micro: int, rank: int) -> None:
        self.accumulation = accumulation_steps(global_batch, world, micro)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        if next_slot < 0:
            raise ValueError(f"next_slot must be ≥ 0, found {next_slot}")
        self.next_slot = next_slot
        self.global_batch = global_batch
        self.world = world
        self.micro = micro
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        return rank_batches(self.next_slot, self.global_batch, self.world, self.micro, self.rank)

    def next_slot_after(self, steps_done: int) -> int:
        """The slot to save in the checkpoint after ``steps_done`` optimizer steps of this sampler: derived from the
        step counter, not from how far the loader's workers have prefetched."""
        return self.next_slot + steps_done * self.global_batch


def build_loader(
    dataset: SlotDataset,
    *,
    next_slot: int,
    global_batch: int,
    micro: int,
    world: int | None = None,
    rank: int | None = None,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader yielding this rank's micro-batches from ``next_slot`` on.

    Args:
        dataset: the slot dataset.
        next_slot: the first slot of the next optimizer step (0, or the resumed state's ``next_slot``).
        global_batch: ``G = world × micro × accumulation`` samples per optimizer step.
        micro: samples per rank per micro-step.
        world, rank: default to :mod:`rmpl_ds.dist`'s view of the job.
        num_workers: DataLoader worker processes (0 reads in the main process); free to change on resume.
        collate_fn: turns a list of transformed items into a batch; :func:`collate_list` by default.
        pin_memory: default: when CUDA is available.
        prefetch_factor: batches each worker reads ahead (torch's default 2 when None and workers > 0).
        worker_init_fn: run in each worker at start (e.g. signal handling); it must not touch sampling state.

    Raises:
        UserError: a batch layout that does not divide the global batch.
    """
    world = dist.world_size() if world is None else world
    rank = dist.rank() if rank is None else rank
    sampler = RankBatchSampler(next_slot, global_batch, world, micro, rank)
    log.info(
        "loader: rank %d/%d, global batch %d = %d ranks × %d micro × %d accumulation, %d workers, from slot %d",
        rank,
        world,
        global_batch,
        world,
        micro,
        sampler.accumulation,
        num_workers,
        next_slot,
    )
    log.info("source-epochs %s", dataset.stream.describe_epochs(next_slot))
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or collate_list,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=worker_init_fn,
        # Starting an iterator draws a worker base seed; from its own generator it leaves the global torch RNG
        # (dropout) untouched, so a resumed run that restores the RNG continues exactly. Workers use no RNG of
        # their own: per-sample randomness comes from (seed, slot).
        generator=torch.Generator().manual_seed(0),
        # In-order delivery is what makes a rank's batches independent of worker timing (torch's default; stated
        # here so nobody turns it off for throughput).
        in_order=True,
    )
