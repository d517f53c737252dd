"""Evaluation while a stage trains: each stream's loss on held-out records, and the best checkpoint.

A stage with an ``eval`` section (:class:`~rmpl_ds.config.StageEvalConfig`) evaluates every ``eval.every`` steps and
after its last step. The held-out records are those of ``eval.splits`` in each stream's shard set (the converters
keep the datasets' own splits: ACE and SWiG ``dev``, MNRE ``val``; the stage trains on ``train_splits``, which must
leave them out). Per stream, ``max_items`` of them, evenly spread over the split, are fixed for the whole stage; each
is rendered for its stream's task exactly as training renders it (an AR item's event type drawn from a seed of its
own) and its loss is the training loss (the recipe's loss path and loss weights do not enter: a stream's eval loss
is the mean of its items' token-mean losses).

With ``eval.generate``, the items of the EM and AR streams are also answered by greedy generation
(rmpl_ds.evaluate.generate: the checkpoint's end tokens, no sampling), parsed by rmpl_ds.tasks and scored strictly
against the item's own target (:func:`item_counts`): EM by event type; AR text arguments by (trigger span, role,
argument span), AR image arguments by role and box, one to one at IoU >= ``eval.iou_threshold``
(rmpl_ds.evaluate.m2e2.match_boxes). A stream's F1 (in percent) is micro over its items; ``eval_f1_by_task`` sums
the counts of the streams of a task.

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

from rmpl_ds import dist, engine, tasks
from rmpl_ds.collate import model_inputs
from rmpl_ds.config import GENERATION_TASKS, StageConfig
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
        "eval_time_s": seconds}``, with ``eval.generate`` also ``eval_f1`` (the mean over the EM and AR streams),
        ``eval_f1_by_stream`` and ``eval_f1_by_task`` (percent)."""
        assert self.stage.eval is not None
        began = time.perf_counter()
        n_streams = len(stream_names)
        # [loss sum per stream, items per stream, then per stream: true positives, predicted, gold]
        sums = torch.zeros(5 * n_streams, dtype=torch.float64, device=device)
        mine = list(range(dist.rank(), len(self.items), dist.world_size()))
        saved_rng = engine.capture_rng()
        module = ds_engine.module
        was_training = module.training
        module.eval()
        try:
            generated: list[tuple[int, Any]] = []  # (item number, example) of this rank's EM and AR items
            with torch.no_grad():
                for start in range(0, len(mine), micro_batch):
                    numbers = mine[start : start + micro_batch]
                    examples = [renderer.example(self.item(number)) for number in numbers]
                    batch = collator(
                        [
                            renderer.encode(example, self.items[number].stream_index)
                            for number, example in zip(numbers, examples, strict=True)
                        ]
                    )
                    if self.stage.eval.generate:
                        generated += [
                            (number, example)
                            for number, example in zip(numbers, examples, strict=True)
                            if self.stage.mixture[self.items[number].stream_index].task in GENERATION_TASKS
                        ]
                    inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k not in _LOOP_KEYS}
                    weights = torch.ones_like(batch["loss_weight"])
                    parts = forward_loss(ds_engine, inputs, batch["labels"], weights, path=loss_path)
                    streams = batch["stream_index"].to(device)
                    losses = parts.sample_losses.to(device=device, dtype=torch.float64)
                    sums[:n_streams].index_add_(0, streams, losses)
                    sums[n_streams : 2 * n_streams].index_add_(0, streams, torch.ones_like(losses))
            if self.stage.eval.generate:
                self._generate(ds_engine, renderer, generated, sums, n_streams, micro_batch)
        finally:
            module.train(was_training)
            engine.restore_rng(saved_rng)
        total = engine.reduce_sums(sums)
        by_stream = {
            name: total[i] / total[n_streams + i] for i, name in enumerate(stream_names) if total[n_streams + i] > 0
        }
        results: dict[str, Any] = {
            "eval_loss": sum(by_stream.values()) / max(len(by_stream), 1),
            "eval_loss_by_stream": by_stream,
            "eval_items": int(sum(total[n_streams : 2 * n_streams])),
        }
        if self.stage.eval.generate:
            counts = {
                name: total[2 * n_streams + 3 * i : 2 * n_streams + 3 * i + 3]
                for i, name in enumerate(stream_names)
                if name in self.streams and self.stage.mixture[i].task in GENERATION_TASKS
            }
            f1_by_stream = {name: f1(*values) for name, values in counts.items()}
            by_task: dict[str, list[float]] = {}
            for name, values in counts.items():
                task_counts = by_task.setdefault(name.rsplit(":", 1)[-1], [0.0, 0.0, 0.0])
                for j in range(3):
                    task_counts[j] += values[j]
            results.update(
                eval_f1=sum(f1_by_stream.values()) / max(len(f1_by_stream), 1),
                eval_f1_by_stream=f1_by_stream,
                eval_f1_by_task={task: f1(*values) for task, values in by_task.items()},
            )
        results["eval_time_s"] = time.perf_counter() - began
        return results

    def _generate(
        self,
        ds_engine: Any,
        renderer: Any,
        generated: list[tuple[int, Any]],
        sums: torch.Tensor,
        n_streams: int,
        micro_batch: int,
    ) -> None:
        """Greedy answers for this rank's EM and AR items (``(item number, rendered example)``, as the loss pass
        rendered them), scored into ``sums`` (tp, predicted, gold per stream)."""
        from rmpl_ds.evaluate.generate import generate

        assert self.stage.eval is not None
        chosen = [number for number, _ in generated]
        examples = [example for _, example in generated]
        answers = generate(
            ds_engine.module,
            renderer.bundle,
            examples,
            max_new_tokens=self.stage.eval.max_new_tokens,
            max_seq_len=renderer.max_seq_len,
            batch_size=micro_batch,
        )
        for number, example, answer in zip(chosen, examples, answers, strict=True):
            tp, predicted, gold = item_counts(example, answer, renderer.boxes, self.stage.eval.iou_threshold)
            base = 2 * n_streams + 3 * self.items[number].stream_index
            sums[base] += tp
            sums[base + 1] += predicted
            sums[base + 2] += gold


def f1(tp: float, predicted: float, gold: float) -> float:
    """F1 in percent; 100 when there was nothing to find and nothing was predicted."""
    return 100.0 if predicted + gold == 0 else 200.0 * tp / (predicted + gold)


def item_counts(example: Any, answer: str, boxes: Any, iou_threshold: float) -> tuple[int, int, int]:
    """(true positives, predicted, gold) of one EM or AR answer against the example's own target, strictly: EM by
    event type; AR text arguments by (trigger span, role, argument span); AR image arguments by role and box, one to
    one at IoU >= ``iou_threshold``."""
    from rmpl_ds.evaluate.m2e2 import match_boxes

    task, meta = example.task, example.meta
    gold = tasks.parse(task, example.target, example_meta=meta, boxes=boxes)
    predicted = tasks.parse(task, answer, example_meta=meta, boxes=boxes)
    if task == "EM":
        gold_types, predicted_types = set(gold.event_types), set(predicted.event_types)
        return len(gold_types & predicted_types), len(predicted_types), len(gold_types)
    if meta["modality"] == "text":
        gold_units = {(e.trigger_span, a.role, a.span) for e in gold.events for a in e.arguments}
        predicted_units = {(e.trigger_span, a.role, a.span) for e in predicted.events for a in e.arguments}
        return len(gold_units & predicted_units), len(predicted_units), len(gold_units)
    gold_boxes = {(a.role, a.box) for e in gold.events for a in e.arguments if a.box is not None}
    predicted_boxes = {(a.role, a.box) for e in predicted.events for a in e.arguments if a.box is not None}
    roles = {role for role, _ in gold_boxes | predicted_boxes}
    tp = sum(
        match_boxes(
            [box for r, box in predicted_boxes if r == role], [box for r, box in gold_boxes if r == role], iou_threshold
        )
        for role in roles
    )
    return tp, len(predicted_boxes), len(gold_boxes)


@dataclass
class BestTracker:
    """Evaluations so far (``[step, metric value]``) and the best one (the lowest loss or the highest F1; the earlier
    step on a tie)."""

    metric: str
    history: list[list[float]] = field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        return self.metric.split("/", 1)[0] == "f1"

    def value(self, results: dict[str, Any]) -> float:
        kind, _, stream = self.metric.partition("/")
        if not stream:
            return float(results.get(f"eval_{kind}", math.nan))
        return float(results.get(f"eval_{kind}_by_stream", {}).get(stream, math.nan))

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
        sign = -1.0 if self.higher_is_better else 1.0
        step, value = min(finite, key=lambda entry: (sign * entry[1], entry[0]))
        return step, value

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "history": [list(entry) for entry in self.history]}

    @classmethod
    def from_state(cls, metric: str, state: dict[str, Any] | None, step: int) -> BestTracker:
        """The tracker a checkpoint saved, up to its ``step`` (none saved, or another metric: empty)."""
        if not state or state.get("metric") != metric:
            return cls(metric)
        return cls(metric, [[int(s), float(v)] for s, v in state.get("history", []) if int(s) <= step])
