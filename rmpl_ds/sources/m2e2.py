"""M2E2, the multimedia event benchmark (shared/notes/FORMATS.md §1): the gold structure and a converter.

The release (``m2e2_annotations.zip``) has five files with fixed names; which file a record is in is part of its
meaning (the setting), so they are found by name in the input directory (or its ``m2e2_annotations/``):

* ``text_only_event.json`` / ``text_multimedia_event.json``: JSON lists of sentences (``sentence_id``, ``words``,
  ``golden-event-mentions`` with end-exclusive token spans). 38 sentence ids occur in both files, each time with
  different events: they are merged by id and keep the events of both, each tagged with its setting
  (``text_only`` or ``multimedia``).
* ``image_only_event.json`` / ``image_multimedia_event.json``: image id -> ``event_type`` and ``role`` -> list of
  ``[flag, x1, y1, x2, y2]`` in pixels of the original image; ``flag`` ("1"/"0", undocumented) is kept.
* ``crossmedia_coref.txt``: ``sentence_id \\t image file \\t event type``, many-to-many. Two real lines disagree
  with the image file's type; every line is kept and each disagreement is reported as a
  :class:`CorefInconsistency`.

:func:`load_m2e2` returns everything the scorer needs as plain data (:class:`M2E2Gold`); :func:`convert` is the
registry converter (sentences, images and coreference links as records, all in split ``test``). On the full
public release the counts are 6,167 unique sentences, 1,297 text events, 391 image events and 309 links.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rmpl_ds.errors import UserError
from rmpl_ds.ontology import EVENT_TYPES, IMAGE_ROLES, TEXT_ROLES
from rmpl_ds.records import (
    Box,
    CrossMediaLink,
    ImageEvent,
    ImageRecord,
    Record,
    TextArgument,
    TextEvent,
    TextSentence,
    Trigger,
    VisualArgument,
)
from rmpl_ds.sources.base import (
    DUPLICATE_ID,
    MALFORMED,
    UNKNOWN_EVENT_TYPE,
    UNKNOWN_ROLE,
    WRONG_TYPE,
    Conversion,
    ImageChecker,
    Problems,
    RecordError,
    Skip,
    check_box,
    count_records,
    describe,
    get,
    get_list,
    join_path,
    json_kind,
    load_json,
    read_lines,
    token_span,
)

SOURCE = "m2e2"
FORMAT = "m2e2"
SPLIT = "test"
TEXT_ONLY = "text_only"
IMAGE_ONLY = "image_only"
MULTIMEDIA = "multimedia"
ANNOTATIONS_DIR = "m2e2_annotations"
IMAGE_SUFFIX = ".jpg"

# File name -> the setting of its events, in the order they are read (text_only first, so merged sentences keep
# text_only's events first).
TEXT_FILES: dict[str, str] = {"text_only_event.json": TEXT_ONLY, "text_multimedia_event.json": MULTIMEDIA}
IMAGE_FILES: dict[str, str] = {"image_only_event.json": IMAGE_ONLY, "image_multimedia_event.json": MULTIMEDIA}
COREF_FILE = "crossmedia_coref.txt"


@dataclass(frozen=True)
class CorefInconsistency:
    """A coreference line whose type the annotation of its image (or sentence) does not confirm.

    ``annotated_types`` is what the image or sentence is annotated with (empty when it is not annotated at all).
    """

    line: int
    sentence_id: str
    image_id: str
    coref_type: str
    side: str
    annotated_types: tuple[str, ...]

    def __str__(self) -> str:
        found = ", ".join(self.annotated_types) or "no annotation"
        target = self.image_id if self.side == "image" else self.sentence_id
        return f"{COREF_FILE}:{self.line}: {self.coref_type} for {self.side} {target}, annotated as {found}"


@dataclass(frozen=True)
class M2E2Gold:
    """The M2E2 gold standard as plain data (no I/O, nothing the scorer must re-derive).

    Attributes:
        sentences: every sentence once (merged by id over both text files), in file order; each event's
            ``setting`` is ``text_only`` or ``multimedia``. Sentences without events are included.
        images: every annotated image, one event each, ``setting`` ``image_only`` or ``multimedia``.
        coref: every line of crossmedia_coref.txt, in order (duplicates and disagreements included).
        inconsistencies: coreference lines whose type the image or sentence annotation does not confirm.
        overlapping_sentence_ids: sentence ids found in both text files.
        skipped: records that could not be read.
    """

    sentences: tuple[TextSentence, ...]
    images: tuple[ImageRecord, ...]
    coref: tuple[CrossMediaLink, ...]
    inconsistencies: tuple[CorefInconsistency, ...] = ()
    overlapping_sentence_ids: tuple[str, ...] = ()
    skipped: tuple[Skip, ...] = ()

    def counts(self) -> dict[str, Any]:
        """The benchmark's headline numbers (the paper's: 6,167 / 1,297 / 1,966 / 391 / 1,429 / 309)."""
        text_events = [event for sentence in self.sentences for event in sentence.events]
        image_events = [event for image in self.images for event in image.events]
        documents = {s.document_id for s in self.sentences} | {i.document_id for i in self.images}
        return {
            "sentences": len(self.sentences),
            "sentences_with_events": sum(1 for sentence in self.sentences if sentence.events),
            "text_events": len(text_events),
            "text_arguments": sum(len(event.arguments) for event in text_events),
            "text_events_by_setting": dict(sorted(Counter(event.setting for event in text_events).items())),
            "images": len(self.images),
            "image_events": len(image_events),
            "image_boxes": sum(len(event.arguments) for event in image_events),
            "image_events_by_setting": dict(sorted(Counter(event.setting for event in image_events).items())),
            "coref_links": len(self.coref),
            "documents": len(documents),
            "overlapping_sentences": len(self.overlapping_sentence_ids),
            "inconsistencies": len(self.inconsistencies),
        }


def document_of(item_id: str) -> str:
    """``VOA_EN_NW_2015.11.26.3074855_5`` -> ``VOA_EN_NW_2015.11.26.3074855`` (split on the last ``_``)."""
    return item_id.rsplit("_", 1)[0]


def annotations_dir(directory: str | Path) -> Path:
    """Where the five files are: ``directory`` or its ``m2e2_annotations/``; UserError naming what is missing."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected the M2E2 annotation files in it)")
    names = [*TEXT_FILES, *IMAGE_FILES, COREF_FILE]
    for candidate in (root, root / ANNOTATIONS_DIR):
        if all((candidate / name).is_file() for name in names):
            return candidate
    missing = [name for name in names if not (root / name).is_file()]
    raise UserError(f"{root}: missing M2E2 file(s) {', '.join(missing)}")


def load_m2e2(directory: str | Path, *, images_dir: str | Path | None = None, strict: bool = False) -> M2E2Gold:
    """Read the five M2E2 files in ``directory`` (see the module docstring) into :class:`M2E2Gold`.

    ``images_dir``: when given, each annotated image must be ``images_dir/<image id>.jpg`` and decode; its size is
    recorded and its boxes must lie inside it (images that fail are skipped; the coreference check still uses
    the annotation). Bad records (a sentence, an image entry, a coreference line) are skipped with a reason, or
    raise :class:`~rmpl_ds.sources.base.SourceError` under ``strict``. A JSON file that is not UTF-8, does not
    parse or is not a list (text) / an object (images) raises UserError naming the file and line, strict or not.
    """
    folder = annotations_dir(directory)
    problems = Problems(strict)
    sentences, overlap = _read_sentences(folder, problems)
    annotated, images = _read_images(folder, problems, ImageChecker(images_dir) if images_dir is not None else None)
    coref = _read_coref(folder / COREF_FILE, problems)
    inconsistencies = _check_coref(coref, sentences, annotated)
    return M2E2Gold(
        sentences=tuple(sentences.values()),
        images=tuple(images),
        coref=tuple(link for _, link in coref),
        inconsistencies=tuple(inconsistencies),
        overlapping_sentence_ids=tuple(overlap),
        skipped=tuple(problems.skipped),
    )


def _read_sentences(folder: Path, problems: Problems) -> tuple[dict[str, TextSentence], list[str]]:
    sentences: dict[str, TextSentence] = {}
    overlap: list[str] = []
    for name, setting in TEXT_FILES.items():
        path = folder / name
        items = load_json(path)
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of sentences, found {json_kind(items)}")
        seen_here: set[str] = set()
        for index, item in enumerate(items):
            try:
                sentence = _sentence(item, setting)
                if sentence.id in seen_here:
                    raise RecordError(
                        DUPLICATE_ID, f"sentence id {sentence.id!r} occurs twice in {name}", "sentence_id"
                    )
                earlier = sentences.get(sentence.id)
                if earlier is not None and earlier.tokens != sentence.tokens:
                    raise RecordError(
                        MALFORMED, f"sentence {sentence.id!r} has other words than in the other text file", "words"
                    )
            except RecordError as problem:
                problems.report_problem(path, f"[{index}]", problem, key_paths=True)
                continue
            seen_here.add(sentence.id)
            if earlier is None:
                sentences[sentence.id] = sentence
            else:
                # The real overlap: same sentence, different events in each file. Keep both sets.
                overlap.append(sentence.id)
                sentences[sentence.id] = replace(earlier, events=earlier.events + sentence.events)
    return sentences, overlap


def _sentence(item: Any, setting: str) -> TextSentence:
    sentence_id = get(item, "sentence_id", str)
    tokens = get_list(item, "words", str)
    events = []
    for number, mention in enumerate(get_list(item, "golden-event-mentions", dict)):
        path = f"golden-event-mentions[{number}]"
        event_type = get(mention, "event_type", str, path)
        if event_type not in EVENT_TYPES:
            raise RecordError(
                UNKNOWN_EVENT_TYPE, f"{event_type!r} is not one of the 8 M2E2 types", join_path(path, "event_type")
            )
        trigger = get(mention, "trigger", dict, path)
        start, end = token_span(trigger, len(tokens), join_path(path, "trigger"))
        trigger_text = get(trigger, "text", str, join_path(path, "trigger"))
        arguments = []
        for arg_number, argument in enumerate(get_list(mention, "arguments", dict, path)):
            argument_path = join_path(path, f"arguments[{arg_number}]")
            role = get(argument, "role", str, argument_path)
            if role not in TEXT_ROLES[event_type]:
                raise RecordError(
                    UNKNOWN_ROLE, f"{event_type} has no text role {role!r}", join_path(argument_path, "role")
                )
            arg_start, arg_end = token_span(argument, len(tokens), argument_path)
            # The argument text is the article's surface string, which can differ from the joined tokens: keep it.
            text = get(argument, "text", str, argument_path)
            arguments.append(TextArgument(role, arg_start, arg_end, text))
        events.append(TextEvent(event_type, Trigger(start, end, trigger_text), tuple(arguments), setting))
    return TextSentence(sentence_id, SOURCE, SPLIT, tuple(tokens), tuple(events), document_of(sentence_id))


def _read_images(
    folder: Path, problems: Problems, images: ImageChecker | None
) -> tuple[dict[str, str], list[ImageRecord]]:
    """(image id -> annotated type for every readable annotation, the image records that pass the image checks)."""
    annotated: dict[str, str] = {}
    records: list[ImageRecord] = []
    for name, setting in IMAGE_FILES.items():
        path = folder / name
        entries = load_json(path)
        if not isinstance(entries, dict):
            raise UserError(f"{path}: expected a JSON object keyed by image id, found {json_kind(entries)}")
        for image_id, entry in entries.items():
            try:
                if image_id in annotated:
                    raise RecordError(DUPLICATE_ID, f"image {image_id!r} is annotated twice")
                event_type, arguments, box_paths = _image_event(entry)
                annotated[image_id] = event_type
                width = height = 0
                if images is not None:
                    width, height = images.size(image_id + IMAGE_SUFFIX)
                    for box_path, box in box_paths:
                        check_box(list(box), box_path, width, height)
            except RecordError as problem:
                problems.report_problem(path, repr(image_id), problem, key_paths=True)
                continue
            event = ImageEvent(event_type, arguments, setting=setting)
            record = ImageRecord(
                image_id, SOURCE, SPLIT, image_id + IMAGE_SUFFIX, width, height, (event,), document_of(image_id)
            )
            records.append(record)
    return annotated, records


def _image_event(entry: Any) -> tuple[str, tuple[VisualArgument, ...], list[tuple[str, Box]]]:
    """(type, arguments, (key path, box) of every box), checked for shape; the image size is checked later."""
    event_type = get(entry, "event_type", str)
    if event_type not in EVENT_TYPES:
        raise RecordError(UNKNOWN_EVENT_TYPE, f"{event_type!r} is not one of the 8 M2E2 types", "event_type")
    arguments = []
    box_paths = []
    for role, boxes in get(entry, "role", dict).items():
        role_path = f"role.{role}"
        if role not in IMAGE_ROLES[event_type]:
            raise RecordError(UNKNOWN_ROLE, f"{event_type} has no image role {role!r}", role_path)
        if not isinstance(boxes, list):
            raise RecordError(
                WRONG_TYPE, f"expected a list of [flag, x1, y1, x2, y2], found {describe(boxes)}", role_path
            )
        for number, flagged in enumerate(boxes):
            box_path = f"{role_path}[{number}]"
            if not isinstance(flagged, list) or len(flagged) != 5 or not isinstance(flagged[0], str):
                raise RecordError(WRONG_TYPE, f"expected [flag, x1, y1, x2, y2], found {describe(flagged)}", box_path)
            box = check_box(flagged[1:], box_path)
            arguments.append(VisualArgument(role, box, flag=flagged[0]))
            box_paths.append((box_path, box))
    return event_type, tuple(arguments), box_paths


def _read_coref(path: Path, problems: Problems) -> list[tuple[int, CrossMediaLink]]:
    links = []
    for line_number, line in read_lines(path, problems):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 3 or not all(column.strip() for column in columns):
            problems.report(
                path, str(line_number), MALFORMED, "expected sentence id, image file, event type separated by tabs"
            )
            continue
        sentence_id, image_file, event_type = (column.strip() for column in columns)
        if event_type not in EVENT_TYPES:
            problems.report(
                path, str(line_number), UNKNOWN_EVENT_TYPE, f"{event_type!r} is not one of the 8 M2E2 types"
            )
            continue
        image_id = image_file.removesuffix(IMAGE_SUFFIX)
        links.append((line_number, CrossMediaLink(sentence_id, image_id, event_type)))
    return links


def _check_coref(
    coref: list[tuple[int, CrossMediaLink]], sentences: Mapping[str, TextSentence], annotated: Mapping[str, str]
) -> list[CorefInconsistency]:
    inconsistencies = []
    for line_number, link in coref:
        image_type = annotated.get(link.image_id)
        if image_type != link.event_type:
            found = (image_type,) if image_type else ()
            inconsistencies.append(
                CorefInconsistency(line_number, link.sentence_id, link.image_id, link.event_type, "image", found)
            )
        sentence = sentences.get(link.sentence_id)
        sentence_types = tuple(sorted({event.event_type for event in sentence.events})) if sentence else ()
        if link.event_type not in sentence_types:
            inconsistencies.append(
                CorefInconsistency(
                    line_number, link.sentence_id, link.image_id, link.event_type, "text", sentence_types
                )
            )
    return inconsistencies


def convert(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """The M2E2 directory -> records: sentences, then images, then the coreference links (split ``test``).

    ``keep_negatives=False`` leaves out the sentences without events. The counts hold :meth:`M2E2Gold.counts` and
    the inconsistencies as text, so the manifest reports them.
    """
    gold = load_m2e2(input_path, images_dir=images_dir, strict=strict)
    sentences = [s for s in gold.sentences if s.events or keep_negatives]
    records: list[Record] = [*sentences, *gold.images, *gold.coref]
    counts = count_records(records)
    counts.update(
        m2e2=gold.counts(),
        inconsistencies=[str(item) for item in gold.inconsistencies],
        negatives_dropped=len(gold.sentences) - len(sentences),
    )
    return Conversion(SOURCE, FORMAT, records, list(gold.skipped), counts)
