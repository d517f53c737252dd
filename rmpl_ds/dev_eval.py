"""Evaluation while a stage trains: each stream's loss on held-out records, and the best checkpoint.

A stage with an ``eval`` section (:class:`~rmpl_ds.config.StageEvalConfig`) evaluates every ``eval.every`` steps and
after its last step. The held-out records are those of ``eval.splits`` in each stream's shard set (the converters
keep the datasets' own splits: ACE and SWiG ``dev``, MNRE ``val``; the stage trains on ``train_splits``, which must
leave them out). Per stream, ``max_items`` of them, evenly spread over the split, are fixed for the whole stage; each
is rendered for its stream's task exactly as training renders it (an AR item's event type drawn from a seed of its
own) and its loss is the training loss (the recipe's loss path and loss weights do not enter: a stream's eval loss
is the mean of its items' token-mean losses).

All ranks share the items (item ``i`` on rank ``i mod world``), run them forward without gradients in eval mode
(no dropout), and add their sums in one all-reduce, so every rank gets the same numbers. The training state is
untouched: the RNG states are restored afterwards (nothing in eval draws from them, but a library could), the data
loader and its prefetched batches are not involved, and the model is put back in train mode.

:class:`BestTracker` keeps the history of evaluations and the best step by ``eval.metric`` (lower is better); it
is saved in every checkpoint's client state, so a resumed run continues the same bookkeeping, and its best step's
checkpoint is protected from the ``keep_last`` rotation (rmpl_ds.checkpoint.save's ``protect``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rmpl_ds import dist, engine
from rmpl_ds.collate import model_inputs
from rmpl_ds.config import StageConfig
from rmpl_ds.loss import LossPath, forward_loss
from rmpl_ds.mixing import sample_seed

# Keeps the eval items' per-sample seeds apart from every training slot's (which come from (seed, slot)).
_EVAL_SLOT_BASE = 1 << 62
_LOOP_KEYS = ("labels", "stream_index", "loss_weight")


@dataclass(frozen=True)
class DevItem:
    stream: str
    stream_index: int
    sample: int  # index into the stream's held-out view


class DevSet:
    """The fixed held-out items of a stage's eval streams (see the module docstring)."""

    def __init__(self, stage: StageConfig, views: dict[str, Any], items: list[DevItem], streams: tuple[str, ...]):
        self.stage = stage
        self.views = views  # stream name -> ShardView of its source's held-out records
        self.items = items
        self.streams = streams

    @classmethod
    def build(cls, stage: StageConfig, opened: dict[str, Any]) -> DevSet:
        """``opened``: source -> its (whole) shard set. Raises UserError for a source with no held-out record."""
        evaluation = stage.eval
        assert evaluation is not None
        wanted = evaluation.streams or tuple(stream.name for stream in stage.mixture)
        by_source: dict[str, Any] = {}
        views: dict[str, Any] = {}
        items: list[DevItem] = []
        for index, stream in enumerate(stage.mixture):
            if stream.name not in wanted:
                continue
            if stream.source not in by_source:
                by_source[stream.source] = opened[stream.source].subset(evaluation.splits)
            view = views[stream.name] = by_source[stream.source]
            count = min(evaluation.max_items, len(view))
            items += [DevItem(stream.name, index, j * len(view) // count) for j in range(count)]
        return cls(stage, views, items, tuple(views))

    @property
    def every(self) -> int:
        assert self.stage.eval is not None
        return self.stage.eval.every

    @property
    def splits(self) -> str:
        assert self.stage.eval is not None
        return "/".join(self.stage.eval.splits)

    def describe(self) -> str:
        counts = {name: sum(1 for item in self.items if item.stream == name) for name in self.streams}
        return ", ".join(f"{name} {count} of {len(self.views[name])}" for name, count in counts.items())

    def item(self, number: int) -> dict[str, Any]:
        """The loader-style item of ``self.items[number]`` (what :class:`rmpl_ds.data.Renderer` takes)."""
        entry = self.items[number]
        view = self.views[entry.stream]
        return {
            **view.read(entry.sample),
            "stream": entry.stream,
            "source": view.source,
            "key": view.key(entry.sample),
            "sample_seed": sample_seed(self.stage.seed, _EVAL_SLOT_BASE + number),
        }

    def evaluate(
        self,
        ds_engine: Any,
        renderer: Any,
        collator: Any,
        *,
        micro_batch: int,
        device: torch.device,
        stream_names: Sequence[str],
        loss_path: LossPath,
    ) -> dict[str, Any]:
        """Every eval stream's loss on its items, the same on every rank (collective: call on every rank).

        Returns ``{"eval_loss": mean over the streams, "eval_loss_by_stream": {stream: loss}, "eval_items": n,
        "eval_time_s": seconds}``."""
        began = time.perf_counter()
        n_streams = len(stream_names)
        sums = torch.zeros(2 * n_streams, dtype=torch.float64, device=device)
        mine = list(range(dist.rank(), len(self.items), dist.world_size()))
        saved_rng = engine.capture_rng()
        module = ds_engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(mine), micro_batch):
                    batch = collator([renderer(self.item(number)) for number in mine[start : start + micro_batch]])
                    inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k not in _LOOP_KEYS}
                    weights = torch.ones_like(batch["loss_weight"])
                    parts = forward_loss(ds_engine, inputs, batch["labels"], weights, path=loss_path)
                    streams = batch["stream_index"].to(device)
                    losses = parts.sample_losses.to(device=device, dtype=torch.float64)
                    sums[:n_streams].index_add_(0, streams, losses)
                    sums[n_streams:].index_add_(0, streams, torch.ones_like(losses))
        finally:
            module.train(was_training)
            engine.restore_rng(saved_rng)
        total = engine.reduce_sums(sums)
        by_stream = {
            name: total[i] / total[n_streams + i] for i, name in enumerate(stream_names) if total[n_streams + i] > 0
        }
        return {
            "eval_loss": sum(by_stream.values()) / max(len(by_stream), 1),
            "eval_loss_by_stream": by_stream,
            "eval_items": int(sum(total[n_streams:])),
            "eval_time_s": time.perf_counter() - began,
        }


@dataclass
class BestTracker:
    """Evaluations so far (``[step, metric value]``) and the best one (lowest value; the earlier step on a tie)."""

    metric: str
    history: list[list[float]] = field(default_factory=list)

    def value(self, results: dict[str, Any]) -> float:
        if self.metric == "loss":
            return float(results["eval_loss"])
        return float(results["eval_loss_by_stream"].get(self.metric.removeprefix("loss/"), math.nan))

    def record(self, step: int, results: dict[str, Any]) -> bool:
        """Add an evaluation; True when it is the new best."""
        value = self.value(results)
        before = self.best
        self.history = [entry for entry in self.history if entry[0] < step] + [[step, value]]
        return self.best is not None and self.best[0] == step and before != self.best

    @property
    def best(self) -> tuple[int, float] | None:
        finite = [(int(step), value) for step, value in self.history if math.isfinite(value)]
        if not finite:
            return None
        step, value = min(finite, key=lambda entry: (entry[1], entry[0]))
        return step, value

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "history": [list(entry) for entry in self.history]}

    @classmethod
    def from_state(cls, metric: str, state: dict[str, Any] | None, step: int) -> BestTracker:
        """The tracker a checkpoint saved, up to its ``step`` (none saved, or another metric: empty)."""
        if not state or state.get("metric") != metric:
            return cls(metric)
        return cls(metric, [[int(s), float(v)] for s, v in state.get("history", []) if int(s) <= step])
