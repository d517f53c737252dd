"""A stage's data: its mixture's shard sets, the slot stream over them, rendering and collation.

Shards hold records (prompts are rendered at load time), so one shard set serves Stage I, Stage II and
evaluation. Per slot, the loader reads the record and its image, :class:`Renderer` renders it for its stream's
task (rmpl_ds.tasks; a conversation of a chat source for the ``chat`` task, rmpl_ds.chat) and encodes it for the
backbone (the adapter's ProcessorBundle), and
:class:`StageCollator` pads the micro-batch and adds each sample's stream index and loss weight.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rmpl_ds import chat, records, tasks
from rmpl_ds.config import Recipe, StageConfig
from rmpl_ds.errors import UserError
from rmpl_ds.example import ChatLabels
from rmpl_ds.grounding import PLAIN, BoxSyntax
from rmpl_ds.loader import SlotDataset, build_loader, build_stream
from rmpl_ds.log import get_logger
from rmpl_ds.mixing import SlotStream
from rmpl_ds.ontology import EVENT_TYPES
from rmpl_ds.shards import ShardSet, ShardView

log = get_logger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def choose_event_type(record: records.Record, rng: Any) -> str:
    """AR asks about one event type: one the record has (uniformly), or for a record without events a random type
    (its target is ``none``, which teaches the model to say so). ``rng`` is the slot's generator."""
    present = tasks.to_structure(record, "EM").event_types
    choices = present or EVENT_TYPES
    return choices[int(rng.integers(len(choices)))]


@dataclass(frozen=True)
class Renderer:
    """Loader transform: a decoded shard sample -> the encoded example of its stream's task (picklable)."""

    bundle: Any
    tasks: tuple[str, ...]  # per stream index
    loss_weights: tuple[float, ...]  # per stream index
    stream_index: dict[str, int]
    max_seq_len: int
    max_target_tokens: int | None = None
    boxes: BoxSyntax = PLAIN  # how image arguments are written (the recipe's tasks.box_format for this backbone)
    chat_labels: ChatLabels = "all"  # the chat task's labelled assistant turns (the recipe's tasks.chat_labels)
    schema_guided: bool = False  # EM, AR and joint prompts list the schema (the recipe's tasks.schema_guided)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return self.encode(self.example(item), self.stream_index[item["stream"]])

    def example(self, item: dict[str, Any]) -> Any:
        """The rendered (not yet encoded) Example or ChatExample of a decoded shard sample for its stream's task."""
        index = self.stream_index[item["stream"]]
        task = self.tasks[index]
        try:
            record = records.from_json(item["json"])
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"shard sample {item.get('key')!r} of {item['source']!r}: not a record: {error}") from None
        if task == chat.CHAT_TASK or isinstance(record, records.ChatRecord):
            where = f"shard sample {item.get('key')!r} of {item['source']!r}"
            if task != chat.CHAT_TASK:
                raise UserError(
                    f"{where}: a conversation cannot train stream {item['stream']!r}: chat records train with task chat"
                )
            images = chat.sample_images(item, record) if isinstance(record, records.ChatRecord) else []
            try:
                return chat.render(record, images, labels=self.chat_labels)
            except ValueError as error:
                raise UserError(f"{where}, stream {item['stream']!r}: {error}") from None
        image = next((item[ext] for ext in IMAGE_MEMBERS if ext in item), None)
        event_type = choose_event_type(record, np.random.default_rng(item["sample_seed"])) if task == "AR" else None
        if isinstance(record, records.TextSentence):
            image = None  # a sentence's task sees no image; the collator adds the dummy one the vision tower needs
        return tasks.render(
            record, task, image=image, event_type=event_type, boxes=self.boxes, schema_guided=self.schema_guided
        )

    def encode(self, example: Any, index: int) -> dict[str, Any]:
        """``example`` encoded for training, with its stream's index and loss weight."""
        encoded = self.bundle.encode(example, max_seq_len=self.max_seq_len, max_target_tokens=self.max_target_tokens)
        encoded["stream_index"] = index
        encoded["loss_weight"] = self.loss_weights[index]
        return encoded


class StageCollator:
    """The backbone's collator plus per-sample ``stream_index`` and ``loss_weight`` tensors."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        stream_index = torch.tensor([item.pop("stream_index") for item in items], dtype=torch.long)
        loss_weight = torch.tensor([item.pop("loss_weight") for item in items], dtype=torch.float32)
        batch = self.collator(items)
        batch["stream_index"] = stream_index
        batch["loss_weight"] = loss_weight
        return batch


def _ignore_signals_in_worker(worker_id: int) -> None:
    # The deepspeed launcher forwards SIGTERM to the whole process tree; a worker that died of it would break the
    # step the rank is finishing before its final checkpoint. Workers exit with their rank instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_batches(batches: Any) -> None:
    """Stop the worker processes of a loader iterator now.

    The slot stream is endless, so an iterator is never exhausted, and its workers ignore SIGTERM (see
    :func:`_ignore_signals_in_worker`): left to the interpreter's exit, multiprocessing would SIGTERM and then join
    them forever. Called by the training loop on every way out of it.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-worker iterator; none with 0 workers
    if shutdown is not None:
        shutdown()


def open_sources(recipe: Recipe, stage: StageConfig) -> dict[str, ShardSet]:
    """Every shard set the stage's mixture reads, opened once per source: manifest, index hashes, tar sizes and
    the member whitelist are checked (cheap; ``rmpl-ds shards verify`` re-hashes the tars), and each stream's task
    fits its set (a chat task reads a chat set, a chat set trains with the chat task). Raises UserError."""
    opened = {
        source: ShardSet.open(recipe.sources[source]) for source in dict.fromkeys(s.source for s in stage.mixture)
    }
    problems = chat.stream_problems(stage, {source: shards.source for source, shards in opened.items()})
    if problems:
        for shards in opened.values():
            shards.close()
        raise UserError("recipe " + recipe.name + ": " + "; ".join(problems))
    return opened


@dataclass
class StageData:
    recipe: Recipe
    stage: StageConfig
    stream: SlotStream
    shards: dict[str, ShardSet | ShardView]
    renderer: Renderer
    collator: StageCollator

    @property
    def stream_names(self) -> tuple[str, ...]:
        return tuple(stream.name for stream in self.stage.mixture)

    @classmethod
    def build(
        cls, recipe: Recipe, stage: StageConfig, bundle: Any, opened: dict[str, ShardSet] | None = None
    ) -> StageData:
        """Build the slot stream over the mixture's sources (``opened`` by :func:`open_sources`, or opened here)."""
        opened = opened if opened is not None else open_sources(recipe, stage)
        trained: dict[str, ShardSet | ShardView] = dict(opened)
        if stage.train_splits:  # the records of those splits only (held-out ones stay out of training)
            trained = {source: shards.subset(stage.train_splits) for source, shards in opened.items()}
            log.info(
                "training on splits %s: %s",
                list(stage.train_splits),
                ", ".join(f"{source} {len(trained[source])} of {len(whole)}" for source, whole in opened.items()),
            )
        shards = {s.name: trained[s.source] for s in stage.mixture}
        phases = [(phase.start_step * stage.global_batch, phase.weights) for phase in stage.phases] or None
        stream = build_stream(
            [(s.name, s.weight) for s in stage.mixture],
            shards,
            seed=stage.seed,
            phases=phases,
            tolerance=stage.window_tolerance,
        )
        names = tuple(s.name for s in stage.mixture)
        renderer = Renderer(
            bundle=bundle,
            tasks=tuple(s.task for s in stage.mixture),
            loss_weights=tuple(s.loss_weight for s in stage.mixture),
            stream_index={name: i for i, name in enumerate(names)},
            max_seq_len=recipe.model.max_seq_len,
            max_target_tokens=recipe.model.max_target_tokens,
            boxes=bundle.box_syntax(recipe.tasks.box_format),
            chat_labels=recipe.tasks.chat_labels,
            schema_guided=recipe.tasks.schema_guided,
        )
        return cls(recipe, stage, stream, shards, renderer, StageCollator(bundle.collator()))

    def loader(
        self, *, next_slot: int, micro_batch: int, num_workers: int, world: int | None = None, rank: int | None = None
    ) -> Any:
        dataset = SlotDataset(self.stream, self.shards, transform=self.renderer)
        return build_loader(
            dataset,
            next_slot=next_slot,
            global_batch=self.stage.global_batch,
            micro=micro_batch,
            world=world,
            rank=rank,
            num_workers=num_workers,
            collate_fn=self.collator,
            worker_init_fn=_ignore_signals_in_worker,
        )
