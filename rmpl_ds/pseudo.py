"""X-MTL pseudo-labels: a trained export labels unlabeled image-caption pairs; agreeing, confident pairs become data.

Input: a shard set of :class:`~rmpl_ds.records.CaptionPair` records with their images (``rmpl-ds shards build
--source pairs``). Per pair, in the order of :func:`label_pairs`:

1. **EM on both sides.** The caption as a :class:`~rmpl_ds.records.TextSentence` (its tokens, no events) and the
   image as an :class:`~rmpl_ds.records.ImageRecord` (the pair's size, no events) are rendered for ``EM``; the greedy
   answers are parsed (:func:`~rmpl_ds.tasks.parse`) and scored
   (:func:`~rmpl_ds.evaluate.generate.generate_scored`: confidence = ``exp(mean token log-probability)`` of the
   answer, its end token included; :data:`CONFIDENCE_DEFINITION`).
2. **The filter** (:func:`decide`, pure). X-MTL keeps a pair when the text and the image are predicted to hold the
   same event type and both confidences exceed the threshold. Here the answers are sets of types, so "the same
   type" is read as: the two sets intersect, and the **agreed types** are the intersection (a caption naming Attack
   and Die over an image of Die keeps Die only). The rules, checked in this order, the first that fails naming the
   rejection (one reason per pair, counted in the manifest):

   ``unparsable``           either EM answer has a parse error (an unknown type, an empty answer): the answer is
                            not a type list, so its confidence is not a confidence in types;
   ``no_event``             either side predicts no event type (``none``);
   ``disagree``             the two type sets do not intersect;
   ``low_confidence_text``  the caption's EM confidence is below the threshold;
   ``low_confidence_image`` the image's EM confidence is below the threshold.

   A pair passing all of them is kept (``confidence >= threshold`` passes).
3. **AR for the agreed types**, on the caption and on the image. Their confidences are recorded (the decisions
   file, the manifest's means) but **not filtered**: X-MTL filters on the event type only, and an AR threshold
   would drop exactly the hard, argument-rich pairs. One rule follows from the record format: a text event needs a
   trigger in the caption, so an agreed type for which the caption's AR answer locates no trigger is dropped from
   both records, and a pair left with no type is rejected as ``no_trigger`` (the sixth reason).
4. **Records.** A kept pair ``P`` becomes two records of source :data:`SOURCE`, split as ``P``, document id ``P``'s
   (else ``P``'s id) so that they stay linked: ``P-text``, a TextSentence of the caption tokens with one event per
   AR mention of an agreed type whose trigger was found (its arguments whose strings were found), and ``P-image``,
   an ImageRecord of ``P``'s image (the input set's image bytes, unchanged) with one event per agreed type and the
   AR boxes as arguments (in pixels of the image).

Output: a normal shard set (:func:`~rmpl_ds.shards.write_shards`: atomic, verified by ``rmpl-ds shards verify``)
whose manifest adds ``pseudo: true``, the model (path, family, weights, the export manifest's sha256 when there is
one, box format), the input set (path, source, fingerprint), the threshold, the confidence definition and the rule,
and the counts: pairs read, kept, rejected by reason, kept pairs per agreed type, the records written, and the mean
AR confidences. A run that keeps no pair writes no set and is an error (exit 2) that prints the counts, like a
``shards build`` that yields nothing. ``decisions`` (optional) is a JSON Lines file with one line per pair read: the
EM answers, confidences, agreed types, AR confidences and the decision, for auditing a threshold.

Several ranks work as ``rmpl-ds eval`` does (rmpl_ds.evaluate.infer): pair ``i`` goes to rank ``i % world``, each
rank a worker process (``python -m rmpl_ds.pseudo``) writing its results to a part file, and the parent merges the
parts by pair index; confidences are rounded to :data:`CONFIDENCE_DIGITS` digits, so the output does not depend on
the number of ranks (as long as one example's greedy answer does not depend on its batch-mates, which holds for
left-padded fp32 batches).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds import atomic
from rmpl_ds.errors import USER_ERROR_EXIT, UserError
from rmpl_ds.log import get_logger
from rmpl_ds.ontology import EVENT_TYPES
from rmpl_ds.records import (
    CaptionPair,
    ImageEvent,
    ImageRecord,
    TextArgument,
    TextEvent,
    TextSentence,
    Trigger,
    VisualArgument,
    from_json,
    to_json,
)
from rmpl_ds.tasks import Parsed

if TYPE_CHECKING:
    from PIL import Image

    from rmpl_ds.evaluate.generate import ScoredAnswer
    from rmpl_ds.evaluate.infer import ModelSource
    from rmpl_ds.example import Example
    from rmpl_ds.grounding import BoxSyntax

logger = get_logger("rmpl_ds.pseudo")  # also when run as __main__ (the ranks)

SOURCE = "pseudo"
DEFAULT_THRESHOLD = 0.8
CONFIDENCE_DEFINITION = (
    "exp(mean log-probability of the greedy answer's tokens, its end token included), the model's softmax over "
    "its raw logits"
)
RULE = (
    "keep when both EM answers parse, both name at least one event type, the two type sets intersect (the agreed "
    "types) and both EM confidences are >= threshold; AR confidences are recorded, not filtered; an agreed type "
    "whose caption AR locates no trigger is dropped"
)
UNPARSABLE = "unparsable"
NO_EVENT = "no_event"
DISAGREE = "disagree"
LOW_CONFIDENCE_TEXT = "low_confidence_text"
LOW_CONFIDENCE_IMAGE = "low_confidence_image"
NO_TRIGGER = "no_trigger"
REJECTION_REASONS: tuple[str, ...] = (
    UNPARSABLE,
    NO_EVENT,
    DISAGREE,
    LOW_CONFIDENCE_TEXT,
    LOW_CONFIDENCE_IMAGE,
    NO_TRIGGER,
)
# Rounding of every recorded confidence: far below any threshold's meaning, and above float noise between batches.
CONFIDENCE_DIGITS = 6
# Pairs are labeled in chunks: a chunk's decoded images are held for its EM and AR passes only.
CHUNK_PAIRS = 64
PARTS_DIR = ".pseudo-parts"
_EXPORT_MANIFEST = "rmpl_export.json"

# A scorer of rendered examples: their greedy answers with confidences, in order (generate_scored on a model).
GenerateFn = Callable[[Sequence["Example"]], list["ScoredAnswer"]]


# ---------------------------------------------------------------------------------------------------------------
# The filter (pure)


@dataclass(frozen=True)
class Decision:
    """Whether a pair is kept; ``types``: the agreed types (EVENT_TYPES order; empty when rejected); ``reason``: the
    first rule it failed (one of :data:`REJECTION_REASONS`), None when kept."""

    kept: bool
    types: tuple[str, ...]
    reason: str | None


def decide(text_em: Parsed, text_conf: float, image_em: Parsed, image_conf: float, threshold: float) -> Decision:
    """The pseudo-label filter on the two EM answers (the module docstring lists the rules in order).

    Raises ValueError for a threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if text_em.errors or image_em.errors:
        return Decision(False, (), UNPARSABLE)
    if not text_em.event_types or not image_em.event_types:
        return Decision(False, (), NO_EVENT)
    agreed = tuple(t for t in EVENT_TYPES if t in text_em.event_types and t in image_em.event_types)
    if not agreed:
        return Decision(False, (), DISAGREE)
    if not text_conf >= threshold:  # written so that a NaN confidence fails too
        return Decision(False, (), LOW_CONFIDENCE_TEXT)
    if not image_conf >= threshold:
        return Decision(False, (), LOW_CONFIDENCE_IMAGE)
    return Decision(True, agreed, None)


# ---------------------------------------------------------------------------------------------------------------
# Labeling


@dataclass(frozen=True)
class PairItem:
    """A pair to label: ``index`` numbers the input set's pairs (the merge order), ``image_member`` its image's
    extension in the input set."""

    index: int
    pair: CaptionPair
    image_member: str


@dataclass(frozen=True)
class PairResult:
    """What labeling one pair gave: the EM answers and confidences, the decision, and (kept) the two records.

    ``ar_confidence``: agreed type -> {"text": c, "image": c}; ``records``: the text and image records as
    :func:`~rmpl_ds.records.to_json` writes them, empty when rejected.
    """

    index: int
    pair_id: str
    reason: str | None
    types: tuple[str, ...]
    text_em: str
    text_confidence: float
    image_em: str
    image_confidence: float
    ar_confidence: dict[str, dict[str, float]] = field(default_factory=dict)
    records: tuple[dict[str, Any], ...] = ()

    @property
    def kept(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.pair_id,
            "kept": self.kept,
            "reason": self.reason,
            "types": list(self.types),
            "text_em": self.text_em,
            "text_confidence": self.text_confidence,
            "image_em": self.image_em,
            "image_confidence": self.image_confidence,
            "ar_confidence": self.ar_confidence,
            "records": list(self.records),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PairResult:
        return cls(
            obj["index"],
            obj["id"],
            obj["reason"],
            tuple(obj["types"]),
            obj["text_em"],
            obj["text_confidence"],
            obj["image_em"],
            obj["image_confidence"],
            obj["ar_confidence"],
            tuple(obj["records"]),
        )


def _rounded(value: float) -> float:
    return round(value, CONFIDENCE_DIGITS) if math.isfinite(value) else value


def _sides(item: PairItem) -> tuple[TextSentence, ImageRecord]:
    """The caption and the image as the records EM and AR render (no events)."""
    pair = item.pair
    sentence = TextSentence(pair.id, pair.source, pair.split, pair.tokens, (), pair.document_id)
    image = ImageRecord(pair.id, pair.source, pair.split, pair.image, pair.width, pair.height, (), pair.document_id)
    return sentence, image


def label_pairs(
    items: Sequence[PairItem],
    generate: GenerateFn,
    load_image: Callable[[PairItem], Image.Image],
    *,
    threshold: float,
    boxes: BoxSyntax,
    schema_guided: bool = False,
) -> list[PairResult]:
    """Label ``items`` (module docstring, steps 1 to 4) and return one result per item, in order.

    ``generate`` answers rendered examples with confidences (:func:`~rmpl_ds.evaluate.generate.generate_scored`
    bound to a model; tests pass a fake); ``load_image`` decodes an item's image; ``boxes`` is the box syntax the
    model writes; ``schema_guided``: the prompts list every type with its definition and roles (a model trained
    with ``tasks.schema_guided``).
    """
    from rmpl_ds.tasks import parse, render

    results: list[PairResult] = []
    for chunk_start in range(0, len(items), CHUNK_PAIRS):
        chunk = items[chunk_start : chunk_start + CHUNK_PAIRS]
        sides = [_sides(item) for item in chunk]
        images = [load_image(item) for item in chunk]
        text_examples = [render(sentence, "EM", schema_guided=schema_guided) for sentence, _ in sides]
        image_examples = [
            render(record, "EM", image=image, boxes=boxes, schema_guided=schema_guided)
            for (_, record), image in zip(sides, images, strict=True)
        ]
        text_answers = generate(text_examples)
        image_answers = generate(image_examples)
        decisions = []
        for n in range(len(chunk)):
            text_em = parse("EM", text_answers[n].text, example_meta=text_examples[n].meta)
            image_em = parse("EM", image_answers[n].text, example_meta=image_examples[n].meta, boxes=boxes)
            decisions.append(
                decide(text_em, text_answers[n].confidence, image_em, image_answers[n].confidence, threshold)
            )
        requests = [(n, event_type) for n, decision in enumerate(decisions) for event_type in decision.types]
        text_ar = [
            render(sides[n][0], "AR", event_type=event_type, schema_guided=schema_guided) for n, event_type in requests
        ]
        image_ar = [
            render(sides[n][1], "AR", image=images[n], event_type=event_type, boxes=boxes, schema_guided=schema_guided)
            for n, event_type in requests
        ]
        text_ar_answers = generate(text_ar) if requests else []
        image_ar_answers = generate(image_ar) if requests else []
        ar: dict[int, dict[str, tuple[Parsed, float, Parsed, float]]] = {}
        for position, (n, event_type) in enumerate(requests):
            ar.setdefault(n, {})[event_type] = (
                parse("AR", text_ar_answers[position].text, example_meta=text_ar[position].meta),
                text_ar_answers[position].confidence,
                parse("AR", image_ar_answers[position].text, example_meta=image_ar[position].meta, boxes=boxes),
                image_ar_answers[position].confidence,
            )
        for n, item in enumerate(chunk):
            results.append(_result(item, decisions[n], text_answers[n], image_answers[n], ar.get(n, {})))
    return results


def _result(
    item: PairItem,
    decision: Decision,
    text_answer: ScoredAnswer,
    image_answer: ScoredAnswer,
    ar: dict[str, tuple[Parsed, float, Parsed, float]],
) -> PairResult:
    pair = item.pair
    ar_confidence = {
        event_type: {"text": _rounded(text_conf), "image": _rounded(image_conf)}
        for event_type, (_, text_conf, _, image_conf) in ar.items()
    }
    reason = decision.reason
    text_events: list[TextEvent] = []
    image_events: list[ImageEvent] = []
    types: list[str] = []
    for event_type in decision.types:
        text_parsed, _, image_parsed, _ = ar[event_type]
        mentions = _text_events(pair.tokens, event_type, text_parsed)
        if not mentions:
            continue  # no trigger in the caption: the type is dropped from both records
        types.append(event_type)
        text_events += mentions
        image_events.append(_image_event(event_type, image_parsed))
    records: tuple[dict[str, Any], ...] = ()
    if decision.kept and not types:
        reason = NO_TRIGGER
    elif decision.kept:
        document_id = pair.document_id or pair.id
        text = TextSentence(f"{pair.id}-text", SOURCE, pair.split, pair.tokens, tuple(text_events), document_id)
        image = ImageRecord(
            f"{pair.id}-image", SOURCE, pair.split, pair.image, pair.width, pair.height, tuple(image_events),
            document_id,
        )  # fmt: skip
        records = (to_json(text), to_json(image))
    return PairResult(
        item.index,
        pair.id,
        reason,
        tuple(types) if reason is None else (),
        text_answer.text,
        _rounded(text_answer.confidence),
        image_answer.text,
        _rounded(image_answer.confidence),
        ar_confidence,
        records,
    )


def _text_events(tokens: tuple[str, ...], event_type: str, parsed: Parsed) -> list[TextEvent]:
    """The AR mentions of ``event_type`` whose trigger was found, each once, with their found arguments."""
    events: list[TextEvent] = []
    seen: set[tuple[int, int]] = set()
    for mention in parsed.events:
        span = mention.trigger_span
        if mention.event_type != event_type or span is None or span in seen:
            continue
        seen.add(span)
        arguments = dict.fromkeys(
            TextArgument(argument.role, *argument.span, " ".join(tokens[argument.span[0] : argument.span[1]]))
            for argument in mention.arguments
            if argument.span is not None
        )
        trigger = Trigger(span[0], span[1], " ".join(tokens[span[0] : span[1]]))
        events.append(TextEvent(event_type, trigger, tuple(arguments)))
    return events


def _image_event(event_type: str, parsed: Parsed) -> ImageEvent:
    arguments = dict.fromkeys(
        VisualArgument(argument.role, tuple(argument.box))  # type: ignore[arg-type]
        for event in parsed.events
        if event.event_type == event_type
        for argument in event.arguments
        if argument.box is not None
    )
    return ImageEvent(event_type, tuple(arguments))


# ---------------------------------------------------------------------------------------------------------------
# Input


def load_pairs(pairs_dir: str | Path, limit: int | None = None) -> list[PairItem]:
    """The pairs of a shard set (the first ``limit``), each with its image member's extension.

    Raises:
        UserError: no shard set there, or a sample that is not a caption pair with an image.
    """
    from rmpl_ds.shards import IMAGE_EXTENSIONS, ShardSet

    directory = Path(pairs_dir)
    if not directory.is_dir():
        raise UserError(f"--pairs {directory}: not a directory (expected a shard set built with --source pairs)")
    items: list[PairItem] = []
    with ShardSet.open(directory) as shards:
        total = len(shards) if limit is None else min(limit, len(shards))
        for index in range(total):
            raw = shards.read_raw(index)
            try:
                record = from_json(json.loads(raw["json"]))
            except (KeyError, ValueError, TypeError) as error:
                raise UserError(f"{directory}: sample {shards.key(index)}: not a readable record ({error})") from None
            if not isinstance(record, CaptionPair):
                raise UserError(
                    f"{directory}: not a pairs set: sample {shards.key(index)} is a {record.kind} record, not a "
                    "caption_pair (build the input with `rmpl-ds shards build --source pairs`)"
                )
            members = [extension for extension in raw if extension in IMAGE_EXTENSIONS]
            if len(members) != 1:
                raise UserError(f"{directory}: sample {shards.key(index)}: expected one image member, found {members}")
            items.append(PairItem(index, record, members[0]))
    if not items:
        raise UserError(f"--pairs {directory}: the shard set holds no pair")
    return items


def _image_loader(pairs_dir: Path) -> Callable[[PairItem], Image.Image]:
    from rmpl_ds.shards import ShardSet

    shards = ShardSet.open(pairs_dir)

    def load(item: PairItem) -> Image.Image:
        return shards.read(item.index)[item.image_member]  # type: ignore[return-value]

    return load


# ---------------------------------------------------------------------------------------------------------------
# The whole run


@dataclass(frozen=True)
class _Run:
    """One run's inputs, to label in this process or in one worker process per rank."""

    source: ModelSource
    pairs_dir: Path
    threshold: float
    batch_size: int
    max_new_tokens: int
    box_format: str
    limit: int | None
    schema_guided: bool = False

    def label(self, items: Sequence[PairItem], device: str | None = None) -> list[PairResult]:
        from rmpl_ds.evaluate.generate import generate_scored
        from rmpl_ds.evaluate.infer import load_for_inference

        model, bundle = load_for_inference(self.source, device)

        def generate(examples: Sequence[Example]) -> list[ScoredAnswer]:
            return generate_scored(
                model, bundle, examples, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
            )

        boxes = bundle.box_syntax(self.box_format)
        return label_pairs(
            items,
            generate,
            _image_loader(self.pairs_dir),
            threshold=self.threshold,
            boxes=boxes,
            schema_guided=self.schema_guided,
        )

    def with_workers(self, world: int, scratch: Path) -> list[PairResult]:
        """One worker per rank; wait for all (stopping the others when one fails); read their parts."""
        import torch

        from rmpl_ds.evaluate.infer import _wait_all

        on_cuda = torch.cuda.is_available()
        if on_cuda and torch.cuda.device_count() < world:
            raise UserError(f"--gpus {world}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        threads = max(1, (os.cpu_count() or 1) // world)
        workers = []
        for rank in range(world):
            command = [
                sys.executable, "-m", "rmpl_ds.pseudo",
                "--model", str(self.source.adapter or self.source.weights), "--family", self.source.family,
                "--pairs", str(self.pairs_dir), "--threshold", repr(self.threshold),
                "--batch-size", str(self.batch_size), "--max-new-tokens", str(self.max_new_tokens),
                "--box-format", self.box_format,
                "--rank", str(rank), "--world", str(world), "--part", str(scratch / f"rank{rank}.jsonl"),
                "--device", f"cuda:{rank}" if on_cuda else "cpu", "--threads", "0" if on_cuda else str(threads),
                *(["--limit", str(self.limit)] if self.limit is not None else []),
                *(["--schema-guided"] if self.schema_guided else []),
            ]  # fmt: skip
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
            workers.append(subprocess.Popen(command, env=env))
        failed = _wait_all(workers)
        if failed:
            rank, code = failed
            raise UserError(
                f"pseudo-label worker rank {rank} of {world} exited with code {code} (its error is printed above); "
                "the other workers were stopped and nothing was written"
            )
        results = []
        for rank in range(world):
            for line in (scratch / f"rank{rank}.jsonl").read_text(encoding="utf-8").splitlines():
                results.append(PairResult.from_json(json.loads(line)))
        return results


def export_digest(model_dir: Path) -> str | None:
    """sha256 of a stage export's manifest (which seals its files), None for a directory that is not one."""
    manifest = model_dir / _EXPORT_MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def summarize(results: Sequence[PairResult]) -> dict[str, Any]:
    """The manifest's counts: read, kept, rejected by reason (every reason listed), kept per agreed type, and the
    mean AR confidences of the kept pairs."""
    rejected = Counter(result.reason for result in results if not result.kept)
    kept_by_type = Counter(event_type for result in results if result.kept for event_type in result.types)
    ar = {
        side: [
            confidence[side]
            for result in results
            if result.kept
            for event_type, confidence in result.ar_confidence.items()
            if event_type in result.types
        ]
        for side in ("text", "image")
    }
    return {
        "read": len(results),
        "kept": sum(result.kept for result in results),
        "rejected": {reason: rejected[reason] for reason in REJECTION_REASONS},
        "kept_by_type": {
            event_type: kept_by_type[event_type] for event_type in EVENT_TYPES if kept_by_type[event_type]
        },
        "ar_confidence_mean": {
            side: _rounded(math.fsum(values) / len(values)) if values else None for side, values in ar.items()
        },
    }


def pseudo_label(
    model_dir: str | Path,
    pairs_dir: str | Path,
    out_dir: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    gpus: int = 1,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    limit: int | None = None,
    family: str | None = None,
    box_format: str | None = None,
    shard_size: int = 1000,
    decisions: str | Path | None = None,
) -> dict[str, Any]:
    """Label the pairs of ``pairs_dir`` with the export ``model_dir`` and write the kept ones to the shard set
    ``out_dir`` (module docstring); returns its manifest.

    ``decisions``: also write one JSON line per pair read (written even when no pair is kept). ``box_format``:
    the box syntax the model writes (default: the export manifest's, else ``native``).

    Raises:
        UserError: a threshold outside (0, 1], bad numbers, a bad model directory, a missing shard set or one that
            is not a pairs set, ``out_dir`` equal to ``pairs_dir``, a failed worker, or no pair kept (then no set is
            written; an existing one is kept).
    """
    from rmpl_ds.commands.shards import record_bytes, sample_key
    from rmpl_ds.evaluate.infer import resolve_model
    from rmpl_ds.shards import ShardSample, ShardSet, read_manifest, write_shards
    from rmpl_ds.sources.base import count_records

    started = time.perf_counter()
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")
    if batch_size < 1 or max_new_tokens < 1 or gpus < 1 or shard_size < 1:
        raise UserError(
            f"--batch-size, --max-new-tokens, --gpus and --shard-size must be >= 1, got {batch_size}, "
            f"{max_new_tokens}, {gpus}, {shard_size}"
        )
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    pairs_path = Path(pairs_dir)
    input_manifest = read_manifest(pairs_path)
    if Path(out_dir).resolve() == pairs_path.resolve():
        raise UserError(f"--out {out_dir}: is the input set; write the pseudo-labels to another directory")
    source = resolve_model(model_dir, family)
    box_format = box_format or source.box_format or "native"
    if box_format not in ("native", "plain"):
        raise UserError(f"box format must be native or plain, got {box_format!r}")
    items = load_pairs(pairs_path, limit)
    logger.info("pseudo-label %d pairs of %s with %s on %d rank(s)", len(items), pairs_path, source.weights, gpus)
    schema_guided = bool(source.schema_guided)
    run = _Run(source, pairs_path, threshold, batch_size, max_new_tokens, box_format, limit, schema_guided)
    if gpus == 1:
        results = run.label(items)
    else:
        scratch = Path(tempfile.mkdtemp(prefix=PARTS_DIR))
        try:
            results = run.with_workers(gpus, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    results.sort(key=lambda result: result.index)
    if [result.index for result in results] != [item.index for item in items]:
        raise RuntimeError("the ranks' results do not cover the pairs exactly once")
    if decisions is not None:
        atomic.write_text(decisions, "".join(json.dumps(result.to_json(), sort_keys=True) + "\n" for result in results))
    counts = summarize(results)
    if not counts["kept"]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in counts["rejected"].items() if count)
        raise UserError(
            f"no pair was kept (read {counts['read']}: {reasons}); {out_dir} was not written (an existing set is "
            f"kept). A model that was not trained for EM, or a threshold of {threshold} above its confidences, "
            "keeps nothing"
        )
    records = [from_json(obj) for result in results for obj in result.records]
    extra_manifest = {
        "pseudo": True,
        "input": {
            "pairs": str(pairs_path),
            "source": input_manifest["source"],
            "fingerprint": ShardSet.open(pairs_path).fingerprint(),
            "limit": limit,
        },
        "model": {
            "path": str(model_dir),
            "family": source.family,
            "weights": str(source.weights),
            "adapter": str(source.adapter) if source.adapter else None,
            "export_manifest_sha256": export_digest(Path(model_dir)),
            "box_format": box_format,
            "schema_guided": schema_guided,
        },
        "threshold": threshold,
        "confidence": CONFIDENCE_DEFINITION,
        "rule": RULE,
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "decoding": "greedy"},
        "counts": {**counts, "records": count_records(records)},
    }
    shards = ShardSet.open(pairs_path)
    by_index = {item.index: item for item in items}

    def samples() -> Any:
        ordinal = 0
        for result in results:
            if not result.kept:
                continue
            text, image = (from_json(obj) for obj in result.records)
            item = by_index[result.index]
            yield ShardSample(sample_key(ordinal, text), {"json": record_bytes(text)})
            image_bytes = shards.read_raw(item.index)[item.image_member]
            yield ShardSample(
                sample_key(ordinal + 1, image), {"json": record_bytes(image), item.image_member: image_bytes}
            )
            ordinal += 2

    manifest = write_shards(samples(), out_dir, source=SOURCE, shard_size=shard_size, extra_manifest=extra_manifest)
    shards.close()
    logger.info(
        "pseudo-label: kept %d of %d pairs (%d records) in %.1f s: %s",
        counts["kept"], counts["read"], len(records), time.perf_counter() - started, out_dir,
    )  # fmt: skip
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Worker entry point: python -m rmpl_ds.pseudo ... (started by pseudo_label, one per rank)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Label one rank's share (pair ``i`` with ``i % world == rank``) and write its results to ``--part``."""
    from rmpl_ds.evaluate.infer import resolve_model
    from rmpl_ds.log import quiet_libraries, setup_logging

    parser = argparse.ArgumentParser(prog="python -m rmpl_ds.pseudo", description=worker_main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--family", required=True)
    parser.add_argument("--pairs", required=True, type=Path)
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--box-format", choices=("native", "plain"), required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--schema-guided", action="store_true")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--part", required=True, type=Path)
    args = parser.parse_args(argv)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the parent's stdout is for its own summary
    setup_logging()
    quiet_libraries()
    try:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        source = resolve_model(args.model, args.family)
        items = [item for item in load_pairs(args.pairs, args.limit) if item.index % args.world == args.rank]
        run = _Run(
            source, args.pairs, args.threshold, args.batch_size, args.max_new_tokens, args.box_format, args.limit,
            args.schema_guided,
        )  # fmt: skip
        results = run.label(items, args.device)
    except UserError as error:
        print(f"pseudo-label worker rank {args.rank}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    atomic.write_text(args.part, "".join(json.dumps(result.to_json()) + "\n" for result in results))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
