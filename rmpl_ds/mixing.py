"""The slot stream: which sample fills each global position of a run. Pure functions, no I/O.

A run consumes one infinite stream of global *slots* ``s = 0, 1, 2, ...``, shared by every rank. Everything
about slot ``s`` is a pure function of the mixture, the seed and ``s`` (notes/STREAMING.md §7):

1. **Schedule** (:class:`RatioSchedule`): a fixed period ``P`` of ``B`` slots holds ``a_k`` copies of stream
   ``k``; slot ``s`` belongs to stream ``P[s mod B]``. The period is chosen to minimize the *window
   discrepancy* ``D``: in every window of any length ``N`` anywhere in the stream, stream ``k`` appears
   ``N·w_k ± D`` times. For the paper's ratios ``D < 1`` (optimal: count ∈ {⌊N·w_k⌋, ⌈N·w_k⌉}); for any
   ``K`` streams ``D ≤ 2 − 1/(K−1)`` (Tijdeman's chairman rule).
2. **Draw**: slot ``s`` is the ``j``-th draw of its stream, ``j = count_before(s, k)`` in O(1).
3. **Source-epoch**: draw ``j`` lies in epoch ``e = j // n_k`` at position ``j mod n_k``; each epoch is a fresh
   permutation of ``range(n_k)`` seeded by ``(seed, blake2b(stream name), origin, e)``, so within one
   source-epoch every sample appears exactly once, however the slots are split over ranks and workers, and a
   stream never runs out.
4. **Placement** (:func:`batch_slots`): optimizer step ``t`` consumes ``G`` consecutive slots; the micro-batch
   of rank ``r`` at micro-step ``m`` is the contiguous run ``start + (m·W + r)·b + [0, b)``, so the window
   bound holds for every micro-batch on every rank.

The resumable state is ``{next_slot, fingerprint}`` (:meth:`SlotStream.state`); resuming rebuilds nothing but
the integer. Changing world size, micro-batch, accumulation or worker count with the same global batch gives
the same slots per step; a different global batch keeps the slot stream and moves the step boundaries.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from rmpl_ds.config import batch_plan
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

log = get_logger(__name__)

STATE_VERSION = 1
# Part of the fingerprint: a checkpoint written under another rule for periods or permutations must not
# silently resume into a different sample stream.
ALGORITHM = (
    "slot-stream/1: period=search|chairman, permutation=numpy-PCG64(SeedSequence[seed,blake2b(name),origin,epoch])"
)

DEFAULT_MAX_DENOMINATOR = 1000
DEFAULT_MAX_PERIOD = 100_000
# Nodes of the exhaustive period search; small mixtures (B ≲ 30) finish inside it and are proven optimal, larger
# ones keep the best found, which is never worse than the chairman rule and so still within the proven bound.
DEFAULT_SEARCH_BUDGET = 50_000
# The search recurses once per slot of the period; beyond this length it rarely improves on the candidates anyway.
SEARCH_MAX_PERIOD = 256
# Permutations kept per SlotStream instance (each DataLoader worker has its own copy): two epochs per stream
# covers the boundary between consecutive source-epochs.
_PERMUTATIONS_PER_STREAM = 2


# --------------------------------------------------------------------------------------------------------------
# (A) The ratio schedule
# --------------------------------------------------------------------------------------------------------------


def integerize(weights: Sequence[float | Fraction], max_denominator: int = DEFAULT_MAX_DENOMINATOR) -> tuple[int, ...]:
    """Integer counts ``a_k`` with ``a_k / Σa`` ≈ ``w_k / Σw``, in lowest terms.

    Each weight is rounded to the nearest fraction with denominator ≤ ``max_denominator`` (so ``0.1`` is 1/10 and
    ``1/3`` typed as ``0.3333333333`` is 1/3); the result is scaled to integers and divided by their gcd.
    Zero weights stay zero.

    Raises:
        UserError: a weight is negative, not finite, or all weights are zero.
    """
    if not weights:
        raise UserError("mixture weights: expected at least one weight, found none")
    fractions = []
    for index, weight in enumerate(weights):
        if isinstance(weight, Fraction):
            value = weight
        else:
            if not math.isfinite(float(weight)):
                raise UserError(f"mixture weights[{index}]: expected a finite number ≥ 0, found {weight!r}")
            value = Fraction(float(weight))
        if value < 0:
            raise UserError(f"mixture weights[{index}]: expected a number ≥ 0, found {weight!r}")
        fractions.append(value.limit_denominator(max_denominator))
    if not any(fractions):
        raise UserError(f"mixture weights: expected at least one weight > 0, found {list(weights)!r}")
    scale = math.lcm(*(fraction.denominator for fraction in fractions))
    counts = [int(fraction * scale) for fraction in fractions]
    divisor = math.gcd(*counts)
    return tuple(count // divisor for count in counts)


def window_discrepancy(pattern: Sequence[int], counts: Sequence[int]) -> Fraction:
    """The exact cyclic window discrepancy ``D`` of a period: the largest ``|count_k(window) − L·a_k/B|``.

    The maximum runs over every source, every start and every window length ``L`` — of the periodic stream, so
    it bounds every window of any length anywhere. With ``f_k(i) = c_k(i) − i·a_k/B`` (``c_k(i)`` = copies of
    ``k`` in ``P[:i]``), ``f_k`` is ``B``-periodic and a window ``[o, o+L)`` deviates by ``f_k(o+L) − f_k(o)``,
    so ``D = max_k (max f_k − min f_k)``: O(B·K).
    """
    period = len(pattern)
    if period != sum(counts):
        raise ValueError(f"pattern has {period} slots but the counts sum to {sum(counts)}")
    worst = max(_scaled_ranges(np.asarray(pattern), counts), default=0)
    return Fraction(int(worst), period)


def _scaled_f(pattern: np.ndarray, source: int, count: int) -> np.ndarray:
    """``B·f_k(i)`` for ``i`` in ``0..B-1`` as integers (``f_k(B) = f_k(0) = 0``)."""
    period = len(pattern)
    hits = np.concatenate(([0], np.cumsum(pattern[:-1] == source, dtype=np.int64)))
    return period * hits - np.arange(period, dtype=np.int64) * count


def _scaled_ranges(pattern: np.ndarray, counts: Sequence[int]) -> list[int]:
    ranges = []
    for source, count in enumerate(counts):
        if count:
            scaled = _scaled_f(pattern, source, count)
            ranges.append(int(scaled.max() - scaled.min()))
    return ranges


def discrepancy_lower_bound(counts: Sequence[int]) -> Fraction:
    """No period with these counts has a smaller ``D``.

    ``B·f_k`` takes ``B/g`` distinct values modulo ``B`` (``g = gcd(a_k, B)``), all multiples of ``g``, so its
    range is at least ``B − g``.
    """
    period = sum(counts)
    return Fraction(max((period - math.gcd(count, period) for count in counts if count), default=0), period)


def chairman_bound(num_sources: int) -> float:
    """Tijdeman's guarantee on ``D`` for ``num_sources`` streams of any weights: ``2 − 1/(K−1)`` (0 for K = 1)."""
    return 0.0 if num_sources <= 1 else 2.0 - 1.0 / (num_sources - 1)


def chairman_sequence(counts: Sequence[int]) -> list[int]:
    """One period of Tijdeman's chairman-assignment sequence for counts ``a_k`` (weights ``a_k / B``).

    Rule (Tijdeman 1980), with ``δ = 1/(2K−2)``: at step ``n = 1..B`` consider the sources whose lag
    ``n·w_k − c_k`` is at least ``δ`` and pick the one with the earliest deadline ``(c_k + 1 − δ)/w_k`` (ties: the
    lowest index). It keeps every prefix within ``1 − δ`` of ``n·w_k``, hence every window within
    ``2 − 1/(K−1)``; after ``B`` steps every ``c_k = a_k`` exactly, so the sequence is ``B``-periodic and the
    bound holds cyclically. Integer arithmetic throughout.
    """
    period = sum(counts)
    active = [source for source, count in enumerate(counts) if count]
    if len(active) == 1:
        return [active[0]] * period
    inverse_delta = 2 * len(active) - 2
    drawn = [0] * len(counts)
    sequence = []
    for step in range(1, period + 1):
        chosen, chosen_num, chosen_den = -1, 0, 1
        for source in active:
            # lag ≥ δ  ⟺  (2K−2)·(n·a_k − c_k·B) ≥ B
            if inverse_delta * (step * counts[source] - drawn[source] * period) >= period:
                # deadline ∝ ((c_k + 1)(2K−2) − 1) / a_k; compared by cross-multiplication
                num, den = (drawn[source] + 1) * inverse_delta - 1, counts[source]
                if chosen < 0 or num * chosen_den < chosen_num * den:
                    chosen, chosen_num, chosen_den = source, num, den
        sequence.append(chosen)
        drawn[chosen] += 1
    return sequence


def largest_lag_sequence(counts: Sequence[int]) -> list[int]:
    """One period of the "largest lag" rule (Megatron's blend rule with its off-by-one fixed): at step ``n``
    pick the source with the largest ``n·w_k − c_k`` (ties: the lowest index). Good in practice, no proof."""
    period = sum(counts)
    drawn = [0] * len(counts)
    sequence = []
    for step in range(1, period + 1):
        chosen = max(range(len(counts)), key=lambda k: (step * counts[k] - drawn[k] * period, -k))
        sequence.append(chosen)
        drawn[chosen] += 1
    return sequence


def ideal_time_sequence(counts: Sequence[int], phases: Sequence[float]) -> list[int]:
    """Source ``k``'s ``j``-th copy is due at ``(j + φ_k)/a_k`` of the period; the sequence is the copies sorted by
    due time (ties: the lowest index). Each source alone is then perfectly balanced; the merge costs a little."""
    due = np.concatenate([(np.arange(count) + phase) / count for count, phase in zip(counts, phases, strict=True)])
    source = np.concatenate([np.full(count, k) for k, count in enumerate(counts)])
    return source[np.lexsort((source, due))].tolist()


def _candidate_periods(counts: Sequence[int]) -> list[list[int]]:
    """Starting points for the search, the chairman rule first (it carries the proven bound)."""
    candidates = [chairman_sequence(counts), largest_lag_sequence(counts)]
    candidates.append(ideal_time_sequence(counts, [0.5] * len(counts)))
    # A few fixed phase vectors (a seeded generator, so every process builds the same period).
    phases = np.random.Generator(np.random.PCG64(len(counts))).integers(0, 16, size=(8, len(counts))) / 16
    candidates += [ideal_time_sequence(counts, row) for row in phases]
    return candidates


def _search_period(counts: Sequence[int], incumbent: list[int], budget: int) -> tuple[list[int], bool]:
    """Branch and bound over arrangements of the multiset, returning (best period, proven optimal).

    Rotations are equivalent, so the first slot is fixed to the first active source. A partial arrangement is
    cut as soon as one source's prefix range of ``B·f_k`` reaches the incumbent's ``D`` (the cyclic range can only
    be larger), which makes the search tiny for balanced mixtures.
    """
    period = sum(counts)
    num_sources = len(counts)
    best = list(incumbent)
    best_range = max(_scaled_ranges(np.asarray(best), counts))
    floor = discrepancy_lower_bound(counts) * period
    if best_range <= floor:
        return best, True
    first = next(source for source, count in enumerate(counts) if count)
    remaining = list(counts)
    remaining[first] -= 1
    values = [period - counts[k] if k == first else -counts[k] for k in range(num_sources)]
    lows = [min(0, value) for value in values]
    highs = [max(0, value) for value in values]
    prefix = [first]
    nodes = 0
    exhausted = False

    def extend() -> bool:
        """Depth-first over the next slot; returns True to stop (optimum reached or budget spent)."""
        nonlocal best, best_range, nodes, exhausted
        if len(prefix) == period:
            width = max(high - low for high, low in zip(highs, lows, strict=True))
            if width < best_range:
                best, best_range = list(prefix), width
                return best_range <= floor
            return False
        for source in range(num_sources):
            if not remaining[source]:
                continue
            nodes += 1
            if nodes > budget:
                exhausted = True
                return True
            saved = (list(values), list(lows), list(highs))
            feasible = True
            for k in range(num_sources):
                values[k] += (period if k == source else 0) - counts[k]
                lows[k] = min(lows[k], values[k])
                highs[k] = max(highs[k], values[k])
                if counts[k] and highs[k] - lows[k] >= best_range:
                    feasible = False
            if feasible:
                remaining[source] -= 1
                prefix.append(source)
                stop = extend()
                prefix.pop()
                remaining[source] += 1
                if stop:
                    values[:], lows[:], highs[:] = saved
                    return True
            values[:], lows[:], highs[:] = saved
        return False

    extend()
    return best, not exhausted


class RatioSchedule:
    """An optimal (or provably bounded) periodic assignment of slots to ``K`` weighted streams.

    Args:
        weights: one weight ≥ 0 per stream (at least one > 0); only ratios matter.
        max_denominator: each weight is rounded to a fraction with at most this denominator (:func:`integerize`).
        tolerance: fail if the window discrepancy ``D`` exceeds it; ``None`` means Tijdeman's bound
            ``2 − 1/(K−1)``, which the construction always meets.
        search_budget: nodes of the exhaustive period search before falling back on the best found.
        max_period: refuse weights whose exact period ``B = Σa_k`` would be longer.

    Attributes:
        counts: integer copies ``a_k`` of each stream per period.
        period: ``B``.
        pattern: the period as a read-only int array of stream indices.
        discrepancy: ``D`` as a float; ``discrepancy_exact`` as a Fraction.
        optimal: True when the search proved no period of these counts has a smaller ``D``.
        rounding_error: the largest ``|a_k/B − w_k/Σw|`` introduced by :func:`integerize`.

    Raises:
        UserError: bad weights, a period over ``max_period``, or ``D`` above ``tolerance``.
    """

    def __init__(
        self,
        weights: Sequence[float | Fraction],
        max_denominator: int = DEFAULT_MAX_DENOMINATOR,
        tolerance: float | None = None,
        search_budget: int = DEFAULT_SEARCH_BUDGET,
        max_period: int = DEFAULT_MAX_PERIOD,
    ) -> None:
        counts = integerize(weights, max_denominator)
        period = sum(counts)
        if period > max_period:
            raise UserError(
                f"mixture weights {list(weights)!r}: as integers they are {':'.join(map(str, counts))}, a period of "
                f"{period} slots (limit {max_period}); round the weights to simpler ratios"
            )
        total = math.fsum(float(weight) for weight in weights)
        self.counts: tuple[int, ...] = counts
        self.period: int = period
        self.rounding_error: float = max(
            abs(count / period - float(weight) / total) for count, weight in zip(counts, weights, strict=True)
        )
        self.active_sources: int = sum(1 for count in counts if count)
        self.bound: float = chairman_bound(self.active_sources)

        # The best candidate is never worse than the chairman rule, so Tijdeman's bound holds for what we keep.
        incumbent = min(_candidate_periods(counts), key=lambda candidate: window_discrepancy(candidate, counts))
        if period <= SEARCH_MAX_PERIOD:
            pattern, self.optimal = _search_period(counts, incumbent, search_budget)
        else:
            pattern = incumbent
            self.optimal = window_discrepancy(incumbent, counts) <= discrepancy_lower_bound(counts)
        self.pattern: np.ndarray = np.asarray(pattern, dtype=np.int32)
        self.pattern.setflags(write=False)
        self.discrepancy_exact: Fraction = window_discrepancy(pattern, counts)
        self.discrepancy: float = float(self.discrepancy_exact)

        limit = self.bound if tolerance is None else tolerance
        if self.discrepancy > limit + 1e-12:
            raise UserError(
                f"mixture weights {list(weights)!r}: the best period found has window discrepancy "
                f"D = {self.discrepancy:.3f}, above the tolerance {limit:.3f}; raise the tolerance or change the "
                "weights"
            )
        # O(1) queries: the rank of each slot among its source's slots in the period, and where each source's
        # copies sit.
        self._positions: list[list[int]] = [[] for _ in counts]
        rank_in_period = np.empty(period, dtype=np.int64)
        for index, source in enumerate(pattern):
            rank_in_period[index] = len(self._positions[source])
            self._positions[source].append(index)
        self._rank_in_period = rank_in_period
        self._counts_array = np.asarray(counts, dtype=np.int64)

    def source_of(self, slot: int) -> int:
        """The stream index of ``slot``."""
        return int(self.pattern[slot % self.period])

    def count_before(self, slot: int, source: int) -> int:
        """How many slots in ``[0, slot)`` belong to ``source`` (the draw index of ``source`` at ``slot``)."""
        cycles, offset = divmod(slot, self.period)
        return cycles * self.counts[source] + bisect_left(self._positions[source], offset)

    def nth_slot(self, source: int, draw: int) -> int:
        """The slot of the ``draw``-th (0-based) slot of ``source``; inverse of :meth:`count_before`.

        Raises:
            ValueError: ``source`` has weight zero.
        """
        if not self.counts[source]:
            raise ValueError(f"source {source} has weight zero and is never drawn")
        cycles, index = divmod(draw, self.counts[source])
        return cycles * self.period + self._positions[source][index]

    def sources(self, start: int, stop: int) -> np.ndarray:
        """Stream indices of slots ``[start, stop)`` (vectorized :meth:`source_of`)."""
        return self.pattern[np.arange(start, stop, dtype=np.int64) % self.period]

    def draws(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream index, draw index within that stream) of each slot in ``[start, stop)``."""
        slots = np.arange(start, stop, dtype=np.int64)
        cycles, offsets = np.divmod(slots, self.period)
        sources = self.pattern[offsets]
        return sources, cycles * self._counts_array[sources] + self._rank_in_period[offsets]

    def window_deviation(self, length: int) -> float:
        """The exact largest ``|count_k − length·a_k/B|`` over every window of ``length`` slots in the stream."""
        if length < 0:
            raise ValueError(f"window length must be ≥ 0, found {length}")
        worst = 0
        for source, count in enumerate(self.counts):
            if count:
                scaled = _scaled_f(self.pattern, source, count)
                worst = max(worst, int(np.abs(np.roll(scaled, -(length % self.period)) - scaled).max()))
        return worst / self.period

    def describe(self, names: Sequence[str] | None = None) -> str:
        """One line for the log: counts, period, ``D`` and its bound."""
        labels = list(names) if names is not None else [str(source) for source in range(len(self.counts))]
        ratio = " ".join(f"{label}={count}" for label, count in zip(labels, self.counts, strict=True))
        shown = " ".join(labels[source] for source in self.pattern[:12])
        more = " ..." if self.period > 12 else ""
        proof = "optimal" if self.optimal else "search budget spent, best found"
        text = (
            f"{ratio}: period {self.period} [{shown}{more}], window discrepancy D = {self.discrepancy:.3f} "
            f"({proof}; bound {self.bound:.3f})"
        )
        if self.rounding_error > 1e-12:
            text += f", weights rounded by up to {self.rounding_error:.2e}"
        return text


# --------------------------------------------------------------------------------------------------------------
# (B)+(C) Streams, source-epochs and permutations
# --------------------------------------------------------------------------------------------------------------


def stable_id(name: str) -> int:
    """A 64-bit id of a stream name that is the same in every process (never Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def epoch_permutation(seed: int, name: str, epoch: int, size: int, origin: int = 0) -> np.ndarray:
    """The order in which stream ``name`` visits its ``size`` samples during source-epoch ``epoch``."""
    entropy = [seed, stable_id(name), origin, epoch]
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).permutation(size)
    return order.astype(np.int32 if size < 2**31 else np.int64)


# Mixed into every per-sample seed so that it never coincides with a permutation's seed sequence.
_AUGMENTATION_DOMAIN = stable_id("rmpl_ds.mixing/augmentation")
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of SplitMix64: a bijective 64-bit mixer (Steele, Lea & Flood 2014)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, slot: int) -> int:
    """A 64-bit seed for the per-sample randomness (augmentation) of ``slot``: a pure function of ``(seed, slot)``,
    so crops and flips are the same whatever rank, worker or prefetch depth handles the slot. An int, because it
    is cheap to compute and to send from a worker (a numpy Generator costs ~0.1 ms to pickle)."""
    return _splitmix64(_splitmix64((seed ^ _AUGMENTATION_DOMAIN) & _MASK64) ^ (slot & _MASK64))


def augmentation_rng(seed: int, slot: int) -> np.random.Generator:
    """``numpy.random.default_rng(sample_seed(seed, slot))``: the generator to draw ``slot``'s augmentations from."""
    return np.random.default_rng(sample_seed(seed, slot))


@dataclass(frozen=True)
class StreamSpec:
    """One entry of a mixture: a stream name (``source`` or ``source:task``), its weight and its sample count."""

    name: str
    weight: float
    size: int


@dataclass(frozen=True)
class SlotRef:
    """Where slot ``slot`` reads from: stream ``stream`` (index ``stream_index``), its ``draw``-th draw, which is
    sample ``sample_id`` of that stream's source in source-epoch ``source_epoch``."""

    slot: int
    stream: str
    stream_index: int
    draw: int
    source_epoch: int
    sample_id: int


@dataclass(frozen=True)
class SlotBlock:
    """Vectorized :class:`SlotRef` for the slots ``start, start+1, ...``: one int64 array per field."""

    start: int
    stream_index: np.ndarray
    draw: np.ndarray
    source_epoch: np.ndarray
    sample_id: np.ndarray


@dataclass(frozen=True)
class _Segment:
    """A stretch of slots ``[start, stop)`` under one schedule; ``draws_at_start[k]`` = draws of k before it."""

    start: int
    stop: float  # math.inf for the last segment
    schedule: RatioSchedule
    draws_at_start: tuple[int, ...]


PhaseWeights = Sequence[float] | Mapping[str, float]


class SlotStream:
    """The whole run's slot → sample map for one mixture of streams.

    Args:
        streams: ``StreamSpec`` or ``(name, weight, size)`` per stream; names unique, sizes ≥ 1.
        seed: the run's seed (≥ 0); with the names it seeds every source-epoch permutation.
        phases: optional curriculum ``[(start_slot, weights), ...]``: from ``start_slot`` on, the mixture uses
            ``weights`` (a sequence aligned with ``streams`` or a mapping name → weight, missing names = 0).
            Start slots are absolute, > 0 and increasing; the streams' own weights hold before the first.
            Draw counts continue across phases; the window bound holds inside each phase.
        shard_hashes: optional stream name → fingerprint of the shards it reads; part of the state fingerprint.
        tolerance, max_denominator: passed to each phase's :class:`RatioSchedule`.
        origin: the first slot this stream serves; draws count from there. 0 except after a resume that
            explicitly started a new phase (:meth:`resume`).

    Raises:
        UserError: an invalid mixture (see the messages) or a discrepancy above ``tolerance``.
    """

    def __init__(
        self,
        streams: Sequence[StreamSpec | tuple[str, float, int]],
        seed: int,
        phases: Sequence[tuple[int, PhaseWeights]] | None = None,
        shard_hashes: Mapping[str, str] | None = None,
        tolerance: float | None = None,
        max_denominator: int = DEFAULT_MAX_DENOMINATOR,
        origin: int = 0,
    ) -> None:
        self.streams: tuple[StreamSpec, ...] = tuple(
            spec if isinstance(spec, StreamSpec) else StreamSpec(str(spec[0]), float(spec[1]), int(spec[2]))
            for spec in streams
        )
        self.seed = seed
        self.names: tuple[str, ...] = tuple(spec.name for spec in self.streams)
        self.sizes: tuple[int, ...] = tuple(spec.size for spec in self.streams)
        self.origin = origin
        self._phases = [(int(start), weights) for start, weights in (phases or [])]
        self._shard_hashes = dict(shard_hashes or {})
        self._tolerance = tolerance
        self._max_denominator = max_denominator
        self._validate()

        table = [(0, tuple(spec.weight for spec in self.streams))]
        table += [(start, self._phase_weights(index, weights)) for index, (start, weights) in enumerate(self._phases)]
        self._schedules = []
        for index, (_, weights) in enumerate(table):
            try:
                self._schedules.append(RatioSchedule(weights, max_denominator=max_denominator, tolerance=tolerance))
            except UserError as error:
                where = "streams' weights" if index == 0 else f"phases[{index - 1}].weights"
                raise UserError(f"{where}: {error}") from None
        self._segments = self._build_segments([start for start, _ in table])
        self._segment_starts = [segment.start for segment in self._segments]
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._fields = self._fingerprint_fields([start for start, _ in table])
        for segment in self._segments:
            log.info("mixture from slot %d: %s", segment.start, segment.schedule.describe(self.names))

    # -- construction ----------------------------------------------------------------------------------------

    def _validate(self) -> None:
        problems = []
        if not self.streams:
            problems.append("streams: expected at least one stream, found none")
        seen: set[str] = set()
        for index, spec in enumerate(self.streams):
            if not spec.name:
                problems.append(f"streams[{index}].name: expected a non-empty name")
            if spec.name in seen:
                problems.append(f"streams[{index}].name: {spec.name!r} appears twice; stream names must be unique")
            seen.add(spec.name)
            if spec.size < 1:
                problems.append(f"streams[{index}] ({spec.name}).size: expected ≥ 1 sample, found {spec.size}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed: expected an integer ≥ 0, found {self.seed!r}")
        if self.origin < 0:
            problems.append(f"origin: expected a slot ≥ 0, found {self.origin}")
        previous = 0
        for index, (start, _) in enumerate(self._phases):
            if start <= previous:
                problems.append(f"phases[{index}].start_slot: expected > {previous} (increasing), found {start}")
            previous = max(previous, start)
        unknown = set(self._shard_hashes) - seen
        if unknown:
            problems.append(f"shard_hashes: no stream named {sorted(unknown)!r}")
        if problems:
            raise UserError("slot stream: " + "; ".join(problems))

    def _phase_weights(self, index: int, weights: PhaseWeights) -> tuple[float, ...]:
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.names)
            if unknown:
                raise UserError(f"phases[{index}].weights: no stream named {sorted(unknown)!r}; streams: {self.names}")
            return tuple(float(weights.get(name, 0.0)) for name in self.names)
        if len(weights) != len(self.names):
            raise UserError(
                f"phases[{index}].weights: expected {len(self.names)} weights (one per stream), found {len(weights)}"
            )
        return tuple(float(weight) for weight in weights)

    def _build_segments(self, starts: list[int]) -> list[_Segment]:
        segments: list[_Segment] = []
        draws = (0,) * len(self.streams)
        for index, schedule in enumerate(self._schedules):
            stop = starts[index + 1] if index + 1 < len(starts) else math.inf
            if stop <= self.origin:
                continue
            start = max(starts[index], self.origin)
            segments.append(_Segment(start, stop, schedule, draws))
            if stop != math.inf:
                length = int(stop) - start
                draws = tuple(draws[k] + schedule.count_before(length, k) for k in range(len(draws)))
        return segments

    def _fingerprint_fields(self, starts: list[int]) -> dict[str, Any]:
        mixture = []
        for start, schedule in zip(starts, self._schedules, strict=True):
            pattern_hash = hashlib.sha256(schedule.pattern.astype("<i4").tobytes()).hexdigest()[:16]
            ratio = ",".join(f"{name}={count}" for name, count in zip(self.names, schedule.counts, strict=True))
            mixture.append({"start_slot": start, "ratio": ratio, "period_sha256": pattern_hash})
        return {
            "algorithm": ALGORITHM,
            "seed": self.seed,
            "streams": {
                name: {"size": size, "shards": self._shard_hashes.get(name)}
                for name, size in zip(self.names, self.sizes, strict=True)
            },
            "mixture": mixture,
        }

    def with_origin(self, origin: int) -> SlotStream:
        """The same mixture, re-anchored so that draws (and source-epochs) start afresh at slot ``origin``."""
        return SlotStream(
            self.streams,
            self.seed,
            phases=self._phases,
            shard_hashes=self._shard_hashes,
            tolerance=self._tolerance,
            max_denominator=self._max_denominator,
            origin=origin,
        )

    # -- queries -----------------------------------------------------------------------------------------------

    @property
    def schedules(self) -> tuple[RatioSchedule, ...]:
        """One schedule per phase (the first covers slot 0 on)."""
        return tuple(self._schedules)

    @property
    def discrepancy(self) -> float:
        """The worst window discrepancy ``D`` over the phases (each phase holds its own bound)."""
        return max(schedule.discrepancy for schedule in self._schedules)

    def _segment(self, slot: int) -> _Segment:
        if slot < self.origin:
            raise ValueError(f"slot {slot} precedes this stream's origin {self.origin}")
        return self._segments[bisect_right(self._segment_starts, slot) - 1]

    def _permutation(self, stream_index: int, epoch: int) -> np.ndarray:
        key = (stream_index, epoch)
        order = self._permutations.get(key)
        if order is None:
            order = epoch_permutation(
                self.seed, self.names[stream_index], epoch, self.sizes[stream_index], origin=self.origin
            )
            self._permutations[key] = order
            while len(self._permutations) > _PERMUTATIONS_PER_STREAM * len(self.streams):
                self._permutations.popitem(last=False)
        else:
            self._permutations.move_to_end(key)
        return order

    def resolve(self, slot: int) -> SlotRef:
        """The stream, draw, source-epoch and sample id of ``slot`` (≥ ``origin``)."""
        segment = self._segment(slot)
        offset = slot - segment.start
        stream_index = segment.schedule.source_of(offset)
        draw = segment.draws_at_start[stream_index] + segment.schedule.count_before(offset, stream_index)
        epoch, position = divmod(draw, self.sizes[stream_index])
        sample_id = int(self._permutation(stream_index, epoch)[position])
        return SlotRef(slot, self.names[stream_index], stream_index, draw, epoch, sample_id)

    def resolve_range(self, start: int, stop: int) -> SlotBlock:
        """:meth:`resolve` for every slot in ``[start, stop)``, vectorized (for tests, benchmarks, the CLI)."""
        if start < self.origin:
            raise ValueError(f"slot {start} precedes this stream's origin {self.origin}")
        stream_index = np.empty(max(stop - start, 0), dtype=np.int64)
        draw = np.empty_like(stream_index)
        for segment in self._segments:
            low, high = max(start, segment.start), min(stop, segment.stop)
            if low >= high:
                continue
            sources, draws = segment.schedule.draws(low - segment.start, int(high) - segment.start)
            stream_index[low - start : int(high) - start] = sources
            draw[low - start : int(high) - start] = draws + np.asarray(segment.draws_at_start, dtype=np.int64)[sources]
        sizes = np.asarray(self.sizes, dtype=np.int64)[stream_index]
        epoch, position = np.divmod(draw, sizes)
        sample_id = np.empty_like(draw)
        for source in np.unique(stream_index):
            in_source = stream_index == source
            for value in np.unique(epoch[in_source]):
                chosen = in_source & (epoch == value)
                sample_id[chosen] = epoch_permutation(
                    self.seed, self.names[source], int(value), self.sizes[source], origin=self.origin
                )[position[chosen]]
        return SlotBlock(start, stream_index, draw, epoch, sample_id)

    def draws_before(self, slot: int) -> tuple[int, ...]:
        """Exact draws of each stream in slots ``[origin, slot)``, in O(#phases)."""
        segment = self._segment(slot)
        offset = slot - segment.start
        return tuple(drawn + segment.schedule.count_before(offset, k) for k, drawn in enumerate(segment.draws_at_start))

    def epochs_at(self, slot: int) -> dict[str, float]:
        """Source-epochs completed by each stream before ``slot`` (fractional; ``int()`` gives whole epochs)."""
        return {
            name: drawn / size
            for name, drawn, size in zip(self.names, self.draws_before(slot), self.sizes, strict=True)
        }

    def epoch_end_slot(self, stream: str, epochs: int) -> int | None:
        """The first slot at which ``stream`` has completed ``epochs`` source-epochs (for "stop after 3 epochs of
        X" rules); ``None`` if its weight is zero from then on."""
        k = self.names.index(stream)
        last_draw = epochs * self.sizes[k] - 1
        if last_draw < 0:
            return self.origin
        for segment in self._segments:
            begin = segment.draws_at_start[k]
            if segment.stop == math.inf:
                end = math.inf if segment.schedule.counts[k] else begin
            else:
                end = begin + segment.schedule.count_before(int(segment.stop) - segment.start, k)
            if begin <= last_draw < end:
                return segment.start + segment.schedule.nth_slot(k, last_draw - begin) + 1
        return None

    def describe_epochs(self, slot: int) -> str:
        """One log line: draws and source-epochs of each stream before ``slot``."""
        parts = [
            f"{name} {drawn} draws = {drawn / size:.3f} epochs"
            for name, drawn, size in zip(self.names, self.draws_before(slot), self.sizes, strict=True)
        ]
        return f"at slot {slot}: " + ", ".join(parts)

    # -- state -------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 over the algorithm, seed, stream names and sizes, shard hashes and every phase's ratio."""
        return _digest(self._fields)

    def state(self, next_slot: int) -> dict[str, Any]:
        """The resumable state to store in the checkpoint's client state: O(1) in the slot, JSON-serializable."""
        if next_slot < self.origin:
            raise ValueError(f"next_slot {next_slot} precedes this stream's origin {self.origin}")
        return {
            "version": STATE_VERSION,
            "next_slot": int(next_slot),
            "origin": self.origin,
            "fingerprint": self.fingerprint(),
            "fields": self._fields,
        }

    def diff_state(self, state: Mapping[str, Any]) -> list[str]:
        """What differs between a saved state's mixture and this one, one ``key: saved -> now`` line each."""
        saved = _flatten(state.get("fields", {}))
        now = _flatten(self._fields)
        lines = []
        for key in sorted(set(saved) | set(now)):
            if key not in now:
                lines.append(f"{key}: {saved[key]!r} -> (absent)")
            elif key not in saved:
                lines.append(f"{key}: (absent) -> {now[key]!r}")
            elif saved[key] != now[key]:
                lines.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
        return lines

    def resume(self, state: Mapping[str, Any], new_phase: bool = False) -> tuple[SlotStream, int]:
        """Check a saved state against this mixture; return the stream to continue with and its ``next_slot``.

        A matching fingerprint resumes exactly (same origin as the saved run). A mismatch raises, listing every
        changed field, unless ``new_phase``: then the stream is re-anchored at ``next_slot`` (draws and
        source-epochs start afresh under the new mixture) and the changes are logged.

        Raises:
            UserError: a malformed state, or a changed mixture without ``new_phase``.
        """
        problems = _state_problems(state)
        if problems:
            raise UserError("checkpoint sampler state: " + "; ".join(problems))
        next_slot = int(state["next_slot"])
        changes = self.diff_state(state)
        if not changes:
            return (self if self.origin == state["origin"] else self.with_origin(int(state["origin"]))), next_slot
        listing = "\n".join(f"  {line}" for line in changes)
        if not new_phase:
            raise UserError(
                "the checkpoint's sampler state does not match this run's data mixture:\n"
                f"{listing}\n"
                "Resume with the same recipe, seed and shards, or explicitly start a new phase to continue from "
                f"slot {next_slot} with the new mixture (draws and source-epochs restart there)."
            )
        log.warning("starting a new sampling phase at slot %d; changed since the checkpoint:\n%s", next_slot, listing)
        return self.with_origin(next_slot), next_slot


def _digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as ``{"a.b[0].c": leaf}`` (key paths for error messages)."""
    if isinstance(value, Mapping):
        items: dict[str, Any] = {}
        for key, inner in value.items():
            items.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return items
    if isinstance(value, list):
        items = {}
        for index, inner in enumerate(value):
            items.update(_flatten(inner, f"{prefix}[{index}]"))
        return items
    return {prefix: value}


def _state_problems(state: Any) -> list[str]:
    if not isinstance(state, Mapping):
        return [f"expected a mapping, found {type(state).__name__}"]
    problems = []
    if state.get("version") != STATE_VERSION:
        problems.append(f"version: expected {STATE_VERSION}, found {state.get('version')!r}")
    for key in ("next_slot", "origin"):
        if not isinstance(state.get(key), int) or state[key] < 0:
            problems.append(f"{key}: expected an integer ≥ 0, found {state.get(key)!r}")
    if not problems and state["origin"] > state["next_slot"]:
        problems.append(f"origin {state['origin']} is after next_slot {state['next_slot']}")
    if not isinstance(state.get("fields"), Mapping):
        problems.append("fields: missing")
    elif state.get("fingerprint") != _digest(state["fields"]):
        problems.append("fingerprint: does not match the saved fields (the state was edited or corrupted)")
    return problems


# --------------------------------------------------------------------------------------------------------------
# (E) Placement over optimizer steps, micro-steps and ranks
# --------------------------------------------------------------------------------------------------------------


def accumulation_steps(global_batch: int, world: int, micro: int) -> int:
    """``A = G / (W·b)``, from the package's one batch-arithmetic function (:func:`rmpl_ds.config.batch_plan`).

    Raises:
        UserError: a non-positive size, or ``G`` not divisible by ``W·b``.
    """
    return batch_plan(global_batch, micro, world).accumulation


def batch_slots(
    step: int, global_batch: int, world: int, micro: int, rank: int, first_slot: int = 0
) -> list[list[int]]:
    """The slots rank ``rank`` consumes at optimizer step ``step``: one contiguous list per micro-step.

    Step ``t`` covers ``[first_slot + t·G, first_slot + (t+1)·G)``; micro-step ``m`` of rank ``r`` is the run
    ``start + (m·W + r)·b + [0, b)``. ``first_slot`` is where step 0 of this batch layout begins (the resumed
    ``next_slot``), so a changed global batch continues the same slot stream.

    Raises:
        UserError: see :func:`accumulation_steps`; ValueError: ``rank`` outside ``[0, world)``.
    """
    accumulation = accumulation_steps(global_batch, world, micro)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    start = first_slot + step * global_batch
    return [
        list(range(start + (micro_step * world + rank) * micro, start + (micro_step * world + rank + 1) * micro))
        for micro_step in range(accumulation)
    ]


def rank_batches(next_slot: int, global_batch: int, world: int, micro: int, rank: int) -> itertools.chain[list[int]]:
    """This rank's micro-batches from ``next_slot`` on, forever (what :class:`~rmpl_ds.loader.RankBatchSampler`
    yields)."""
    accumulation_steps(global_batch, world, micro)
    return itertools.chain.from_iterable(
        batch_slots(step, global_batch, world, micro, rank, first_slot=next_slot) for step in itertools.count()
    )
