"""Stream loss weights that move during training: dynamic weight averaging (DWA), as X-MTL uses it.

DWA (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", 2019) weights task ``k`` at time ``t``
by how slowly its loss is falling::

    W_k(t) = K * exp(alpha * r_k) / sum_j exp(alpha * r_j),     r_k = L_k(t-1) / L_k(t-2)

with K tasks (the weights sum to K) and ``alpha`` the temperature factor (X-MTL: 0.5; the original writes 1/T, T=2).
Here a task is a stream of the stage's mixture and a time step is a window of ``window`` optimizer steps:
``L_k`` is stream k's mean per-sample loss (the token-mean cross entropy, before any weight) over the window's
samples. The original averages over an epoch; per step the ratio would be noise.

* The weights are 1 until every stream has two window means; from then on they change only when a window closes
  (after optimizer step ``window``, ``2 x window``, ...), and hold for the steps of the next window.
* A stream that drew no sample in a window keeps its previous mean (ratio 1 for it); a skipped step (non-finite
  loss) adds nothing to the window.
* A stream's effective weight is its recipe ``loss_weight`` times ``W_k``: X-MTL's pseudo-label tasks start at
  beta = 0.5 and DWA moves them like the others. The sampling ratios do not change; only the loss weights do.

The state (the window's sums, the last two means, the weights) is part of every checkpoint, so a resumed run
computes the same weights as an uninterrupted one; every number is a function of the losses reduced over the ranks,
so all ranks hold the same state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rmpl_ds.config import LossWeightingConfig


def dwa_weights(previous: Sequence[float], before_previous: Sequence[float], temperature: float) -> list[float]:
    """``K * softmax(temperature * previous / before_previous)``: the DWA weights of K streams (they sum to K)."""
    ratios = [temperature * last / first for last, first in zip(previous, before_previous, strict=True)]
    top = max(ratios)
    exps = [math.exp(ratio - top) for ratio in ratios]
    total = sum(exps)
    return [len(exps) * value / total for value in exps]


@dataclass
class StreamWeights:
    """The loss weights of a stage's streams: fixed (the recipe's ``loss_weight``) or moved by DWA.

    ``factors`` are the DWA weights ``W_k`` (all 1 for ``kind: fixed``); :attr:`weights` the effective ones.
    Call :meth:`observe` once per optimizer step, after the step, with its reduced per-stream losses.
    """

    config: LossWeightingConfig
    names: tuple[str, ...]
    base: tuple[float, ...]
    factors: list[float] = field(default_factory=list)
    # Per stream: the open window's loss sum and sample count, and the means of the last two closed windows.
    window_sums: list[float] = field(default_factory=list)
    window_counts: list[int] = field(default_factory=list)
    means: list[list[float | None]] = field(default_factory=list)  # [[L(t-2), L(t-1)] per stream]

    def __post_init__(self) -> None:
        k = len(self.names)
        self.factors = self.factors or [1.0] * k
        self.window_sums = self.window_sums or [0.0] * k
        self.window_counts = self.window_counts or [0] * k
        self.means = self.means or [[None, None] for _ in range(k)]

    @property
    def dynamic(self) -> bool:
        return self.config.kind == "dwa"

    @property
    def weights(self) -> dict[str, float]:
        """Each stream's effective loss weight: ``loss_weight x W_k``."""
        return {name: b * f for name, b, f in zip(self.names, self.base, self.factors, strict=True)}

    def observe(self, step: int, loss_by_stream: Mapping[str, float], counts: Mapping[str, int]) -> bool:
        """Add optimizer step ``step``'s per-stream mean losses (over ``counts`` samples each) to the window; when
        ``step`` closes a window, record its means and recompute the weights. Returns whether the weights changed
        (always False for fixed weights)."""
        if not self.dynamic:
            return False
        for i, name in enumerate(self.names):
            count = counts.get(name, 0)
            if count and name in loss_by_stream and math.isfinite(loss_by_stream[name]):
                self.window_sums[i] += loss_by_stream[name] * count
                self.window_counts[i] += count
        if step % self.config.window:
            return False
        for i in range(len(self.names)):
            if self.window_counts[i]:
                mean = self.window_sums[i] / self.window_counts[i]
                self.means[i] = [self.means[i][1], mean]
            elif self.means[i][1] is not None:  # no sample this window: the previous mean again (ratio 1)
                self.means[i] = [self.means[i][1], self.means[i][1]]
            self.window_sums[i], self.window_counts[i] = 0.0, 0
        if any(first is None or last is None or first <= 0 for first, last in self.means):
            return False
        self.factors = dwa_weights(
            [last for _, last in self.means],  # type: ignore[misc]
            [first for first, _ in self.means],  # type: ignore[misc]
            self.config.temperature,
        )
        return True

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain Python numbers: restored bitwise)."""
        return {
            "names": list(self.names),
            "factors": list(self.factors),
            "window_sums": list(self.window_sums),
            "window_counts": list(self.window_counts),
            "means": [list(pair) for pair in self.means],
        }

    @classmethod
    def build(cls, config: LossWeightingConfig, names: Sequence[str], base: Sequence[float]) -> StreamWeights:
        return cls(config, tuple(names), tuple(float(b) for b in base))

    def restored(self, state: Mapping[str, Any] | None) -> StreamWeights:
        """This object with a checkpoint's state; a checkpoint without one (fixed weights, or written before DWA)
        or with other streams (a new phase) starts the windows over."""
        if not self.dynamic or not state or list(state.get("names", ())) != list(self.names):
            return self
        return StreamWeights(
            self.config,
            self.names,
            self.base,
            factors=[float(v) for v in state["factors"]],
            window_sums=[float(v) for v in state["window_sums"]],
            window_counts=[int(v) for v in state["window_counts"]],
            means=[[None if v is None else float(v) for v in pair] for pair in state["means"]],
        )
