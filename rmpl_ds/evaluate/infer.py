"""M2E2 inference: greedy generation for EM and AR, parsed into the scorer's prediction lines, scored and reported.

The pipeline per item (a sentence or an image), in the order of :func:`predict_shard`:

1. **EM**: ``render(record, "EM")`` asks for the event types; :func:`~rmpl_ds.tasks.parse` reads them back.
2. **AR**: for each predicted type (in :data:`~rmpl_ds.ontology.EVENT_TYPES` order), ``render(record, "AR",
   event_type=T)`` asks for its mentions: trigger spans and text arguments for a sentence, argument boxes for an
   image. With ``oracle_types`` the gold types of the item are asked for instead and EM is not run (AR in
   isolation; the event-mention scores are then those of an oracle and say nothing about the model).
3. **Lines**: :func:`text_events` / :func:`image_events` turn the parsed structures into prediction lines
   (:mod:`rmpl_ds.evaluate.m2e2`). A type EM predicted is always an event line, even when AR found no mention of it
   (the event-mention unit is (item, type)); a text argument whose string was not found in the sentence is kept as
   a text argument (the scorer matches it by its normalized text), a trigger that was not found leaves the line
   without a trigger. Malformed output is counted (:class:`InferenceStats`), never fatal.

Images. The image given to ``render`` is the decoded original (:func:`~rmpl_ds.images.load_image`, upright), and
its record carries the original width and height; the backbone adapter resizes every image to the paper's 512×512
itself. Boxes are written on the [0, 1000) grid of the image, which does not depend on that resize, and
:func:`~rmpl_ds.tasks.parse` maps them back to original pixels with the size in ``example.meta``; so predicted boxes
are in the pixels of the original M2E2 image, as the scorer expects.

Which items. Sentences: every sentence of both text files (negatives included), in file order. Images: every
``<id>.jpg`` in the images directory whose document (the id up to its last ``_``) has a sentence or an annotated
image, sorted by id, so unannotated images of the articles are predicted on too (the release lists only images with
events; a prediction on any other image counts against precision). ``settings`` (``text``, ``image``,
``multimedia``) says which lines are written; ``multimedia`` alone runs only the sentences and images of documents
that have both. ``limit`` keeps the first ``limit`` sentences and the first ``limit`` images, and the scores are then
against the gold restricted to them (coreference triples with both sides kept).

Multimedia rule (:func:`pair_multimedia`). For every sentence S and image I of the same document (M2E2 ids are
``<document id>_<index>``), and every type T that was predicted for both S and I, one multimedia line
(S, I, T) is written, with the text arguments of all of S's T events and the boxes of I's T event (each set without
duplicates). Pairs are not restricted to gold multimedia sentences or images, as the scorer's multimedia setting
counts every multimedia line.

Several ranks. Items are numbered once (sentences, then images) and rank ``r`` of ``w`` takes the items with
``index % w == r``. :func:`evaluate_model` with ``gpus > 1`` starts one worker per rank (``python -m
rmpl_ds.evaluate.infer``, device ``cuda:r`` when CUDA is available, else the CPU with its cores split), each writing
its text and image lines to a part file; the parent merges the parts by item index and pairs the multimedia lines
over the whole set, so ``predictions.jsonl`` does not depend on the number of ranks (as long as one example's greedy
answer does not depend on its batch-mates, which holds for left-padded fp32 batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds import atomic
from rmpl_ds.errors import USER_ERROR_EXIT, UserError
from rmpl_ds.evaluate.m2e2 import (
    DEFAULT_IOU_THRESHOLD,
    BoxArgumentPrediction,
    EventPrediction,
    ImageEventPrediction,
    MultimediaEventPrediction,
    Predictions,
    TextArgumentPrediction,
    TextEventPrediction,
    read_predictions,
    write_predictions,
)
from rmpl_ds.log import get_logger
from rmpl_ds.ontology import EVENT_TYPES
from rmpl_ds.records import ImageRecord, TextSentence
from rmpl_ds.sources.m2e2 import IMAGE_SUFFIX, SOURCE, SPLIT, M2E2Gold, document_of, load_m2e2
from rmpl_ds.tasks import Parsed, ParsedEvent

if TYPE_CHECKING:
    from rmpl_ds.backbones.adapter import ProcessorBundle
    from rmpl_ds.example import Example
    from rmpl_ds.grounding import BoxSyntax

logger = get_logger("rmpl_ds.evaluate.infer")  # also when run as __main__ (the ranks)

EVAL_SETTINGS: tuple[str, ...] = ("text", "image", "multimedia")
# Items are generated for in chunks: a chunk's decoded original images are held for its EM and AR passes only.
CHUNK_ITEMS = 64
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"
STATS_FILE = "eval_stats.json"
PARTS_DIR = ".eval-parts"
# The directory name of a stage export (rmpl_ds.handoff.EXPORT_DIR); its stage's name is the better model name.
_EXPORT_DIR_NAME = "export"
_ADAPTER_CONFIG = "adapter_config.json"
_EXPORT_MANIFEST = "rmpl_export.json"


# ---------------------------------------------------------------------------------------------------------------
# Assembly: parsed structures -> prediction lines (pure)


def _unique(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def _canonical(arguments: Iterable[Any]) -> tuple[Any, ...]:
    """Pooled arguments without duplicates, sorted by role, then span (spans before texts) or box."""

    def key(argument: TextArgumentPrediction | BoxArgumentPrediction) -> tuple[Any, ...]:
        if isinstance(argument, BoxArgumentPrediction):
            return (argument.role, argument.box)
        return (argument.role, argument.span is None, argument.span or (0, 0), argument.text or "")

    return tuple(sorted(set(arguments), key=key))


def text_events(sentence_id: str, event_types: Sequence[str], ar: Mapping[str, Parsed]) -> list[TextEventPrediction]:
    """The text lines of one sentence: for each type in ``event_types``, one line per AR mention, or one line
    without trigger and arguments when AR (``ar[type]``, absent = nothing) found none.

    A found string becomes a span, one not found in the sentence stays a text argument.
    """
    lines = []
    for event_type in event_types:
        parsed = ar.get(event_type)
        mentions = [event for event in parsed.events if event.event_type == event_type] if parsed else []
        if not mentions:
            lines.append(TextEventPrediction(sentence_id, event_type))
        for mention in mentions:
            arguments = _unique(
                TextArgumentPrediction(argument.role, span=argument.span)
                if argument.span is not None
                else TextArgumentPrediction(argument.role, text=argument.text)
                for argument in mention.arguments
                if argument.span is not None or argument.text
            )
            lines.append(TextEventPrediction(sentence_id, event_type, mention.trigger_span, arguments))
    return lines


def image_events(image_id: str, event_types: Sequence[str], ar: Mapping[str, Parsed]) -> list[ImageEventPrediction]:
    """The image lines of one image: one line per type in ``event_types`` with the boxes AR gave it (pixels of the
    original image, as :func:`~rmpl_ds.tasks.parse` returns them)."""
    lines = []
    for event_type in event_types:
        parsed = ar.get(event_type)
        events: Sequence[ParsedEvent] = parsed.events if parsed else ()
        boxes = _unique(
            BoxArgumentPrediction(argument.role, tuple(argument.box))  # type: ignore[arg-type]
            for event in events
            if event.event_type == event_type
            for argument in event.arguments
            if argument.box is not None
        )
        lines.append(ImageEventPrediction(image_id, event_type, boxes))
    return lines


def pair_multimedia(
    text: Sequence[TextEventPrediction], image: Sequence[ImageEventPrediction]
) -> list[MultimediaEventPrediction]:
    """The multimedia lines (module docstring): (S, I, T) for a sentence S and an image I of one document that both
    have a line of type T, with S's text arguments of T and I's boxes of T.

    Ordered by sentence, then image (each in the order of its first line), then type; the pooled arguments are
    sorted, so which pairs and arguments come out does not depend on the order of the lines.
    """
    sentences: dict[str, dict[str, list[TextArgumentPrediction]]] = {}
    for line in text:
        sentences.setdefault(line.sentence_id, {}).setdefault(line.event_type, []).extend(line.arguments)
    images: dict[str, dict[str, list[BoxArgumentPrediction]]] = {}
    for line in image:
        images.setdefault(line.image_id, {}).setdefault(line.event_type, []).extend(line.arguments)
    images_of: dict[str, list[str]] = defaultdict(list)
    for image_id in images:
        images_of[document_of(image_id)].append(image_id)
    pairs = []
    for sentence_id, sentence_types in sentences.items():
        for image_id in images_of.get(document_of(sentence_id), ()):
            image_types = images[image_id]
            for event_type in EVENT_TYPES:
                if event_type in sentence_types and event_type in image_types:
                    pairs.append(
                        MultimediaEventPrediction(
                            sentence_id,
                            image_id,
                            event_type,
                            _canonical(sentence_types[event_type]),
                            _canonical(image_types[event_type]),
                        )
                    )
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Which items


@dataclass(frozen=True)
class EvalItem:
    """A sentence or an image to generate for; ``index`` numbers all items of the plan (sentences first)."""

    index: int
    item_id: str
    sentence: TextSentence | None = None
    image_path: Path | None = None

    @property
    def modality(self) -> str:
        return "text" if self.sentence is not None else "image"

    @property
    def key(self) -> tuple[str, str]:
        """(modality, id): M2E2 sentence and image ids share one form, ``<document id>_<index>``."""
        return self.modality, self.item_id


@dataclass(frozen=True)
class EvalPlan:
    """The items of one evaluation (the same for every rank) and the gold they are scored against."""

    items: tuple[EvalItem, ...]
    gold: M2E2Gold
    settings: tuple[str, ...]

    def shard(self, rank: int, world: int) -> list[EvalItem]:
        """Rank ``rank``'s items: those with ``index % world == rank``."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard ({rank}, {world}): expected 0 <= rank < world")
        return [item for item in self.items if item.index % world == rank]

    def counts(self) -> dict[str, int]:
        modalities = Counter(item.modality for item in self.items)
        return {"sentences": modalities["text"], "images": modalities["image"]}


def parse_settings(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"text,image"`` or an iterable of names -> the settings in :data:`EVAL_SETTINGS` order; UserError if unknown."""
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in EVAL_SETTINGS]
    if unknown or not names:
        raise UserError(
            f"settings: expected a non-empty list of {', '.join(EVAL_SETTINGS)}, found {', '.join(names) or 'nothing'}"
        )
    return tuple(setting for setting in EVAL_SETTINGS if setting in names)


def plan_items(gold: M2E2Gold, images_dir: str | Path, settings: Iterable[str], limit: int | None = None) -> EvalPlan:
    """The items to run (module docstring, "Which items") and the gold to score them against.

    ``images_dir`` is read only when the settings include ``image`` or ``multimedia``: a text-only evaluation needs no
    images (M2E2 does not distribute them with its annotations), so the folder may then be empty or absent.

    Raises:
        UserError: ``images_dir`` is not a directory, an annotated image is not in it, or ``limit`` < 1.
    """
    chosen = parse_settings(settings)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    folder = Path(images_dir)
    uses_images = bool({"image", "multimedia"}.intersection(chosen))
    if uses_images and not folder.is_dir():
        raise UserError(f"{folder}: not a directory (expected the M2E2 images, <image id>{IMAGE_SUFFIX})")
    missing = [record.image for record in gold.images if not (folder / record.image).is_file()] if uses_images else []
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{folder}: {len(missing)} annotated M2E2 image(s) missing: {shown}")
    documents = {sentence.document_id for sentence in gold.sentences} | {record.document_id for record in gold.images}
    image_ids = sorted(
        path.name.removesuffix(IMAGE_SUFFIX)
        for path in (folder.glob(f"*{IMAGE_SUFFIX}") if uses_images else ())
        if path.is_file() and document_of(path.name.removesuffix(IMAGE_SUFFIX)) in documents
    )
    sentences = list(gold.sentences)
    if "text" not in chosen:
        image_documents = {document_of(image_id) for image_id in image_ids}
        sentences = [sentence for sentence in sentences if sentence.document_id in image_documents]
    if "image" not in chosen and "multimedia" in chosen:
        sentence_documents = {sentence.document_id for sentence in sentences}
        image_ids = [image_id for image_id in image_ids if document_of(image_id) in sentence_documents]
    elif "image" not in chosen:
        image_ids = []
    if "text" not in chosen and "multimedia" not in chosen:
        sentences = []
    if limit is not None:
        sentences, image_ids = sentences[:limit], image_ids[:limit]
        gold = _restrict_gold(gold, {s.id for s in sentences}, set(image_ids))
    items = [EvalItem(index, sentence.id, sentence=sentence) for index, sentence in enumerate(sentences)]
    items += [
        EvalItem(len(sentences) + number, image_id, image_path=folder / (image_id + IMAGE_SUFFIX))
        for number, image_id in enumerate(image_ids)
    ]
    return EvalPlan(tuple(items), gold, chosen)


def _restrict_gold(gold: M2E2Gold, sentence_ids: set[str], image_ids: set[str]) -> M2E2Gold:
    return replace(
        gold,
        sentences=tuple(s for s in gold.sentences if s.id in sentence_ids),
        images=tuple(record for record in gold.images if record.id in image_ids),
        coref=tuple(link for link in gold.coref if link.sentence_id in sentence_ids and link.image_id in image_ids),
        inconsistencies=(),
    )


def _gold_types(gold: M2E2Gold) -> dict[tuple[str, str], tuple[str, ...]]:
    """(modality, id) -> the gold event types (a sentence and an image can have the same id)."""
    types: dict[tuple[str, str], set[str]] = defaultdict(set)
    for sentence in gold.sentences:
        types["text", sentence.id].update(event.event_type for event in sentence.events)
    for record in gold.images:
        types["image", record.id].update(event.event_type for event in record.events)
    return {key: tuple(t for t in EVENT_TYPES if t in found) for key, found in types.items()}


# ---------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class InferenceStats:
    """What one rank (or, summed, the whole run) did. Keys of the counters are ``"<task>/<modality>"``.

    Attributes:
        items: items generated for, by modality (``text`` / ``image``).
        generations: answers generated.
        parse_errors: malformed fragments the task parser counted (:attr:`~rmpl_ds.tasks.Parsed.errors`).
        malformed_outputs: answers with at least one parse error.
        unreadable_images: images skipped because they could not be decoded (``id: reason``).
        seconds: wall time of the generation, per rank.
    """

    items: Counter[str] = field(default_factory=Counter)
    generations: Counter[str] = field(default_factory=Counter)
    parse_errors: Counter[str] = field(default_factory=Counter)
    malformed_outputs: Counter[str] = field(default_factory=Counter)
    unreadable_images: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, other: InferenceStats) -> None:
        self.items.update(other.items)
        self.generations.update(other.generations)
        self.parse_errors.update(other.parse_errors)
        self.malformed_outputs.update(other.malformed_outputs)
        self.unreadable_images.extend(other.unreadable_images)
        self.seconds.extend(other.seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "items": dict(sorted(self.items.items())),
            "generations": dict(sorted(self.generations.items())),
            "parse_errors": dict(sorted(self.parse_errors.items())),
            "malformed_outputs": dict(sorted(self.malformed_outputs.items())),
            "unreadable_images": list(self.unreadable_images),
            "seconds": [round(value, 3) for value in self.seconds],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> InferenceStats:
        return cls(
            Counter(obj["items"]),
            Counter(obj["generations"]),
            Counter(obj["parse_errors"]),
            Counter(obj["malformed_outputs"]),
            list(obj["unreadable_images"]),
            [float(value) for value in obj["seconds"]],
        )


@dataclass
class _Prepared:
    """An item ready to render: its record and, for an image, the decoded original."""

    item: EvalItem
    record: TextSentence | ImageRecord
    image: Any = None


def predict_shard(
    model: Any,
    bundle: ProcessorBundle,
    plan: EvalPlan,
    *,
    batch_size: int,
    max_new_tokens: int,
    box_format: str = "native",
    shard: tuple[int, int] = (0, 1),
    oracle_types: bool = False,
    schema_guided: bool = False,
) -> tuple[list[TextEventPrediction | ImageEventPrediction], InferenceStats]:
    """Generate EM and AR for the items of ``shard`` = (rank, world) and return their text and image lines.
    ``box_format``: the box syntax prompts ask for and answers are read in (``native`` or ``plain``; the one the
    model was trained with). ``schema_guided``: the prompts list every type with its definition and roles (a model
    trained with ``tasks.schema_guided``).

    Lines come in item order (each item's lines together, types in EVENT_TYPES order). No multimedia lines: they
    pair items that may sit on other ranks (:func:`finish_predictions` makes them).
    """
    from rmpl_ds.images import ImageError, load_image

    started = time.perf_counter()
    stats = InferenceStats()
    boxes = bundle.box_syntax(box_format)
    gold_types = _gold_types(plan.gold) if oracle_types else {}
    lines: list[TextEventPrediction | ImageEventPrediction] = []
    items = plan.shard(*shard)
    for chunk_start in range(0, len(items), CHUNK_ITEMS):
        prepared = []
        for item in items[chunk_start : chunk_start + CHUNK_ITEMS]:
            if item.sentence is not None:
                prepared.append(_Prepared(item, item.sentence))
                continue
            try:
                image = load_image(item.image_path)  # type: ignore[arg-type]
            except ImageError as error:
                logger.warning("skipping image %s: %s", item.item_id, error)
                stats.unreadable_images.append(f"{item.item_id}: {error}")
                continue
            width, height = image.size
            record = ImageRecord(
                item.item_id, SOURCE, SPLIT, item.item_id + IMAGE_SUFFIX, width, height, (), document_of(item.item_id)
            )
            prepared.append(_Prepared(item, record, image))
        for entry in prepared:
            stats.items[entry.item.modality] += 1

        if oracle_types:
            types = {entry.item.index: gold_types.get(entry.item.key, ()) for entry in prepared}
        else:
            em = _generate_and_parse(
                model,
                bundle,
                boxes,
                [(entry, None) for entry in prepared],
                "EM",
                batch_size,
                max_new_tokens,
                stats,
                schema_guided,
            )
            types = {
                entry.item.index: tuple(t for t in EVENT_TYPES if t in parsed.event_types)
                for entry, parsed in zip(prepared, em, strict=True)
            }
        requests = [(entry, event_type) for entry in prepared for event_type in types[entry.item.index]]
        ar = _generate_and_parse(model, bundle, boxes, requests, "AR", batch_size, max_new_tokens, stats, schema_guided)
        answers: dict[int, dict[str, Parsed]] = defaultdict(dict)
        for (entry, event_type), parsed in zip(requests, ar, strict=True):
            answers[entry.item.index][event_type] = parsed  # type: ignore[index]
        for entry in prepared:
            index = entry.item.index
            if entry.item.sentence is not None:
                lines.extend(text_events(entry.item.item_id, types[index], answers[index]))
            else:
                lines.extend(image_events(entry.item.item_id, types[index], answers[index]))
        done = min(chunk_start + CHUNK_ITEMS, len(items))
        logger.info("items %d/%d (%.0f s)", done, len(items), time.perf_counter() - started)
    stats.seconds.append(time.perf_counter() - started)
    return lines, stats


def _generate_and_parse(
    model: Any,
    bundle: ProcessorBundle,
    boxes: BoxSyntax,
    requests: Sequence[tuple[_Prepared, str | None]],
    task: str,
    batch_size: int,
    max_new_tokens: int,
    stats: InferenceStats,
    schema_guided: bool = False,
) -> list[Parsed]:
    """Render every (item, AR type or None) for ``task``, generate in batches of one modality, parse each answer."""
    from rmpl_ds.evaluate.generate import generate
    from rmpl_ds.tasks import parse, render

    parsed: list[Parsed | None] = [None] * len(requests)
    for modality in ("text", "image"):
        positions = [n for n, (entry, _) in enumerate(requests) if entry.item.modality == modality]
        if not positions:
            continue
        examples: list[Example] = [
            render(
                requests[n][0].record,
                task,
                image=requests[n][0].image,
                event_type=requests[n][1],
                boxes=boxes,
                schema_guided=schema_guided,
            )
            for n in positions
        ]
        answers = generate(model, bundle, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
        key = f"{task}/{modality}"
        for position, example, answer in zip(positions, examples, answers, strict=True):
            result = parse(task, answer, example_meta=example.meta, boxes=boxes)
            stats.generations[key] += 1
            stats.parse_errors[key] += result.errors
            stats.malformed_outputs[key] += result.errors > 0
            parsed[position] = result
    return parsed  # type: ignore[return-value]


def finish_predictions(plan: EvalPlan, lines: Iterable[EventPrediction]) -> Predictions:
    """The run's predictions from every rank's text and image lines: put in item order (stable), paired into
    multimedia lines over the whole set, and kept for the plan's settings only."""
    order = {item.key: item.index for item in plan.items}
    lines = list(lines)
    text = sorted(
        (line for line in lines if isinstance(line, TextEventPrediction)),
        key=lambda line: order["text", line.sentence_id],
    )
    image = sorted(
        (line for line in lines if isinstance(line, ImageEventPrediction)),
        key=lambda line: order["image", line.image_id],
    )
    multimedia = pair_multimedia(text, image) if "multimedia" in plan.settings else []
    return Predictions(
        text=tuple(text) if "text" in plan.settings else (),
        image=tuple(image) if "image" in plan.settings else (),
        multimedia=tuple(multimedia),
    )


def predict_m2e2(
    model: Any,
    bundle: ProcessorBundle,
    gold: M2E2Gold,
    *,
    images_dir: str | Path,
    settings: Iterable[str] = EVAL_SETTINGS,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    box_format: str = "native",
    limit: int | None = None,
    oracle_types: bool = False,
    schema_guided: bool = False,
) -> tuple[Predictions, InferenceStats]:
    """All predictions of a loaded model on M2E2 in this process (one rank); see the module docstring."""
    plan = plan_items(gold, images_dir, settings, limit)
    lines, stats = predict_shard(
        model,
        bundle,
        plan,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        box_format=box_format,
        oracle_types=oracle_types,
        schema_guided=schema_guided,
    )
    return finish_predictions(plan, lines), stats


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names: merged weights (``weights``), or a PEFT adapter (``adapter``) on ``weights``; a stage
    export's manifest also says which box syntax it was trained to write (``box_format``) and whether its prompts
    were schema-guided (``schema_guided``); None elsewhere."""

    weights: Path
    family: str
    adapter: Path | None = None
    box_format: str | None = None
    schema_guided: bool | None = None


def resolve_model(model_dir: str | Path, family: str | None = None) -> ModelSource:
    """Find the weights of ``model_dir``: a Hugging Face directory (a merged stage export is one), or a stage's
    adapter export whose manifest or ``adapter_config.json`` names its base model.

    Raises:
        UserError: not a directory, neither kind of model directory, or a family that does not match.
    """
    from rmpl_ds.backbones import FAMILIES

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a Hugging Face model directory or a stage export)")
    adapter_dir = None
    weights = path
    if not (path / "config.json").is_file() and (path / _ADAPTER_CONFIG).is_file():
        adapter_dir = path
        weights = _adapter_base(path)
    if not (weights / "config.json").is_file():
        raise UserError(
            f"{weights}: no config.json; expected a Hugging Face model directory (a merged export) or a LoRA "
            "adapter export"
        )
    detected = family_of(weights)
    if family is not None and family != detected:
        if family not in FAMILIES:
            raise UserError(f"unknown backbone {family!r}; known backbones: {', '.join(sorted(FAMILIES))}")
        raise UserError(f"{weights}: a {detected} checkpoint, not {family}")
    manifest = path / _EXPORT_MANIFEST
    recorded = _read_json(manifest) if manifest.is_file() else {}
    return ModelSource(
        weights.resolve(),
        detected,
        adapter_dir.resolve() if adapter_dir else None,
        recorded.get("box_format"),
        recorded.get("schema_guided"),
    )


def _adapter_base(adapter_dir: Path) -> Path:
    for name, key in ((_EXPORT_MANIFEST, "base_model"), (_ADAPTER_CONFIG, "base_model_name_or_path")):
        path = adapter_dir / name
        if path.is_file():
            base = _read_json(path).get(key)
            if isinstance(base, str) and base and Path(base).expanduser().is_dir():
                return Path(base).expanduser()
    raise UserError(
        f"{adapter_dir}: a LoRA adapter whose base model directory is not named in {_EXPORT_MANIFEST} or "
        f"{_ADAPTER_CONFIG} (or does not exist here); evaluate a merged export instead"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def family_of(model_dir: str | Path) -> str:
    """The backbone family of a HF directory, from config.json's ``model_type``; UserError if none matches."""
    from rmpl_ds.backbones import specs

    config = _read_json(Path(model_dir) / "config.json")
    model_type = config.get("model_type")
    for spec in specs():
        if spec.model_type == model_type:
            return spec.name
    known = ", ".join(f"{spec.model_type} ({spec.name})" for spec in specs())
    raise UserError(f"{model_dir}/config.json: model_type {model_type!r} is none of the known backbones: {known}")


def load_for_inference(source: ModelSource, device: str | None = None) -> tuple[Any, ProcessorBundle]:
    """(model in eval mode without gradients, bundle) on ``device`` (default: ``cuda:0`` or the CPU).

    Weights are bf16 on CUDA and fp32 on the CPU (bf16 matmuls are slow there); a LoRA adapter is merged in.
    """
    import torch

    from rmpl_ds.backbones import get_adapter

    adapter = get_adapter(source.family)
    target = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model, bundle = adapter.load(source.weights, "full", gradient_checkpointing=False, dtype=dtype, device=target)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = True
    model.config.get_text_config().use_cache = True
    return model, bundle


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation


def model_name(model_dir: str | Path) -> str:
    """A model's name in reports: its directory's name, or the stage's for a stage export (``<stage>/export``)."""
    path = Path(model_dir).expanduser().resolve()
    return path.parent.name if path.name == _EXPORT_DIR_NAME and path.parent.name else path.name


def evaluate_model(
    model_dir: str | Path,
    m2e2_dir: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    settings: Iterable[str] = EVAL_SETTINGS,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    gpus: int = 1,
    name: str | None = None,
    limit: int | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    oracle_types: bool = False,
    family: str | None = None,
    box_format: str | None = None,
    schema_guided: bool | None = None,
) -> dict[str, Any]:
    """Predict, score and report one model on M2E2; returns the `rmpl-ds score --json` object.

    ``box_format`` (``native`` or ``plain``): the box syntax the model writes; by default the one a stage export's
    manifest records (what it was trained with), else ``native`` (a base checkpoint's own). ``schema_guided``: ask
    with schema-guided prompts; by default as the export's manifest records, else not.

    Writes ``out_dir/predictions.jsonl``, ``eval_stats.json``, ``report.md`` + ``f1.png`` and, last,
    ``scores.json``: each file under a temporary name and renamed, and a previous run's ``scores.json`` is removed
    first, so a ``scores.json`` that is there belongs to the predictions beside it.

    Raises:
        UserError: a bad model directory, M2E2 directory or images directory, bad numbers, more GPUs than there are,
            or a failed worker.
    """
    started = time.perf_counter()
    if batch_size < 1 or max_new_tokens < 1 or gpus < 1:
        raise UserError(f"batch_size, max_new_tokens and gpus must be >= 1, got {batch_size}, {max_new_tokens}, {gpus}")
    if not 0.0 < iou_threshold <= 1.0:
        raise UserError(f"iou_threshold must be in (0, 1], found {iou_threshold}")
    source = resolve_model(model_dir, family)
    box_format = box_format or source.box_format or "native"
    if box_format not in ("native", "plain"):
        raise UserError(f"box format must be native or plain, got {box_format!r}")
    schema_guided = bool(source.schema_guided) if schema_guided is None else schema_guided
    gold = load_m2e2(m2e2_dir, strict=True)
    plan = plan_items(gold, images_dir, settings, limit)
    name = name or model_name(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SCORES_FILE).unlink(missing_ok=True)
    logger.info(
        "eval %s (%s) on %d sentences and %d images, settings %s, %d rank(s)",
        name, source.weights, plan.counts()["sentences"], plan.counts()["images"], ",".join(plan.settings), gpus,
    )  # fmt: skip
    run = _Run(
        source,
        Path(m2e2_dir),
        Path(images_dir),
        plan,
        batch_size,
        max_new_tokens,
        box_format,
        limit,
        oracle_types,
        schema_guided,
    )
    lines, stats = run.in_process() if gpus == 1 else run.with_workers(gpus, out)
    predictions = finish_predictions(plan, lines)
    write_predictions(out / PREDICTIONS_FILE, predictions)

    from rmpl_ds.evaluate.m2e2 import score_m2e2

    scores = score_m2e2(plan.gold, predictions, iou_threshold=iou_threshold).to_json()
    summary = {
        "name": name,
        "model": str(Path(model_dir)),
        "weights": str(source.weights),
        "adapter": str(source.adapter) if source.adapter else None,
        "family": source.family,
        "m2e2": str(m2e2_dir),
        "images": str(images_dir),
        "settings": list(plan.settings),
        "limit": limit,
        "oracle_types": oracle_types,
        "box_format": box_format,
        "schema_guided": schema_guided,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "ranks": gpus,
        "plan": plan.counts(),
        "lines": {
            "text": len(predictions.text),
            "image": len(predictions.image),
            "multimedia": len(predictions.multimedia),
        },
        **stats.to_json(),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic.write_text(out / STATS_FILE, json.dumps(summary, indent=1) + "\n")
    _write_report(out, name, scores, summary)
    atomic.write_text(out / SCORES_FILE, json.dumps(scores, indent=2) + "\n")
    logger.info("eval %s done in %.1f s: %s", name, summary["wall_seconds"], out)
    return scores


@dataclass(frozen=True)
class _Run:
    """One evaluation's inputs, to run in this process or in one worker process per rank."""

    source: ModelSource
    m2e2_dir: Path
    images_dir: Path
    plan: EvalPlan
    batch_size: int
    max_new_tokens: int
    box_format: str
    limit: int | None
    oracle_types: bool
    schema_guided: bool = False

    def in_process(self) -> tuple[list[TextEventPrediction | ImageEventPrediction], InferenceStats]:
        model, bundle = load_for_inference(self.source)
        return predict_shard(
            model,
            bundle,
            self.plan,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            box_format=self.box_format,
            oracle_types=self.oracle_types,
            schema_guided=self.schema_guided,
        )

    def with_workers(self, world: int, out: Path) -> tuple[list[EventPrediction], InferenceStats]:
        """Start one worker per rank, wait for all (stopping the others when one fails), merge their parts."""
        import shutil

        import torch

        on_cuda = torch.cuda.is_available()
        if on_cuda and torch.cuda.device_count() < world:
            raise UserError(f"--gpus {world}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        parts = out / PARTS_DIR
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
        threads = max(1, (os.cpu_count() or 1) // world)
        workers = []
        for rank in range(world):
            command = [
                sys.executable, "-m", "rmpl_ds.evaluate.infer",
                "--model", str(self.source.adapter or self.source.weights), "--family", self.source.family,
                "--m2e2", str(self.m2e2_dir), "--images", str(self.images_dir),
                "--settings", ",".join(self.plan.settings),
                "--batch-size", str(self.batch_size), "--max-new-tokens", str(self.max_new_tokens),
                "--box-format", self.box_format,
                "--rank", str(rank), "--world", str(world), "--part", str(parts / f"rank{rank}.jsonl"),
                "--device", f"cuda:{rank}" if on_cuda else "cpu", "--threads", "0" if on_cuda else str(threads),
                *(["--limit", str(self.limit)] if self.limit is not None else []),
                *(["--oracle-types"] if self.oracle_types else []),
                *(["--schema-guided"] if self.schema_guided else []),
            ]  # fmt: skip
            # RANK makes the workers' logging rank-aware (rank 0 alone prints progress); no process group is made.
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
            workers.append(subprocess.Popen(command, env=env))
        failed = _wait_all(workers)
        if failed:
            rank, code = failed
            raise UserError(
                f"eval worker rank {rank} of {world} exited with code {code} (its error is printed above); "
                f"the other workers were stopped and nothing was written"
            )
        lines: list[EventPrediction] = []
        stats = InferenceStats()
        for rank in range(world):
            part = parts / f"rank{rank}.jsonl"
            lines.extend(read_predictions(part).events())
            stats.add(InferenceStats.from_json(_read_json(part.with_suffix(".stats.json"))))
        shutil.rmtree(parts, ignore_errors=True)
        return lines, stats


def _wait_all(workers: list[subprocess.Popen[bytes]]) -> tuple[int, int] | None:
    """Wait for every worker; on the first failure stop the others and return (rank, exit code)."""
    pending = dict(enumerate(workers))
    try:
        while pending:
            for rank, worker in list(pending.items()):
                code = worker.poll()
                if code is None:
                    continue
                del pending[rank]
                if code != 0:
                    for other in pending.values():
                        other.terminate()
                    for other in pending.values():
                        other.wait()
                    return rank, code
            time.sleep(0.2)
    except BaseException:
        for worker in pending.values():
            worker.kill()
            worker.wait()
        raise
    return None


def _write_report(out: Path, name: str, scores: dict[str, Any], summary: dict[str, Any]) -> None:
    """report.md (Table 2 with one row) and f1.png, from the report module; scores.json is written by the caller
    as the single score object (the report module's write_report would write a {name: scores} mapping)."""
    from rmpl_ds.evaluate.report import plot_f1, render_markdown

    def counts(mapping: Mapping[str, Any]) -> str:
        return ", ".join(f"{key} {value}" for key, value in mapping.items()) or "none"

    notes = [
        "## Run",
        "",
        f"Model `{summary['model']}` ({summary['family']}"
        + (f", adapter on `{summary['weights']}`" if summary["adapter"] else "")
        + f"); M2E2 `{summary['m2e2']}`, images `{summary['images']}`.",
        f"Settings predicted: {', '.join(summary['settings'])}; greedy, {summary['box_format']} boxes, batch "
        f"{summary['batch_size']}, at most {summary['max_new_tokens']} new tokens; {summary['ranks']} rank(s); "
        f"{summary['wall_seconds']:.1f} s.",
        f"Items: {summary['plan']['sentences']} sentences, {summary['plan']['images']} images"
        + (f" (the first {summary['limit']} of each; scored against their gold only)" if summary["limit"] else "")
        + f". Lines written: {counts(summary['lines'])}.",
        f"Generations: {counts(summary['generations'])}. Parse errors: {counts(summary['parse_errors'])} "
        f"(answers with any: {counts(summary['malformed_outputs'])}).",
    ]
    if summary["unreadable_images"]:
        notes.append(f"Unreadable images skipped: {len(summary['unreadable_images'])}.")
    if summary["oracle_types"]:
        notes.append(
            "AR was asked for the gold event types (--oracle-types): the event-mention scores are an oracle's."
        )
    plot_f1({name: scores}, out / "f1.png")
    atomic.write_text(out / "report.md", render_markdown({name: scores}, extra_md="\n".join(notes) + "\n"))


# ---------------------------------------------------------------------------------------------------------------
# Worker entry point: python -m rmpl_ds.evaluate.infer ... (started by evaluate_model, one per rank)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Run one rank's share and write its text and image lines to ``--part`` (+ ``.stats.json``)."""
    from rmpl_ds.log import quiet_libraries, setup_logging

    parser = argparse.ArgumentParser(prog="python -m rmpl_ds.evaluate.infer", description=worker_main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--family", required=True)
    parser.add_argument("--m2e2", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--box-format", choices=("native", "plain"), required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--oracle-types", action="store_true")
    parser.add_argument("--schema-guided", action="store_true")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--part", required=True, type=Path)
    args = parser.parse_args(argv)
    # The parent's stdout may be a JSON stream (`rmpl-ds eval --json`): what libraries print goes to stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    setup_logging()
    quiet_libraries()
    try:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        source = resolve_model(args.model, args.family)
        plan = plan_items(load_m2e2(args.m2e2, strict=True), args.images, args.settings, args.limit)
        model, bundle = load_for_inference(source, args.device)
        lines, stats = predict_shard(
            model,
            bundle,
            plan,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            box_format=args.box_format,
            shard=(args.rank, args.world),
            oracle_types=args.oracle_types,
            schema_guided=args.schema_guided,
        )
    except UserError as error:
        print(f"eval worker rank {args.rank}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    atomic.write_text(args.part.with_suffix(".stats.json"), json.dumps(stats.to_json()))
    write_predictions(args.part, lines)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
