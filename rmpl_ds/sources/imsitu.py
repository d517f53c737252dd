"""imSitu and SWiG situations -> M2E2 image events (shared/notes/FORMATS.md §3).

* ``imsitu``: a split file is one JSON object keyed by image file name; each record has a ``verb`` and three
  ``frames`` (one per annotator) mapping each of the verb's roles to a WordNet noun id, or ``""`` for an empty role.
* ``swig``: the same records plus ``width``, ``height`` (of the ``images_512`` release) and ``bb[role] =
  [x1, y1, x2, y2]`` in that image, where ``[-1, -1, -1, -1]`` means the role is not grounded.
* ``imsitu_space.json`` (found in the input directory, or beside the input file) gives the verbs with their role
  sets and the noun glosses. It is optional: without it verbs and role sets are not checked and nouns have no
  gloss. Noun ids it does not know are tolerated (the real fixture holds none of the nouns its records use).

A verb that M2E2's ``ace_sr_mapping.txt`` maps becomes one :class:`~rmpl_ds.records.ImageEvent` of the mapped
type whose arguments are the mapped roles that M2E2's image schema has for the type
(:data:`rmpl_ds.ontology.IMAGE_ROLES`; e.g. ``Place`` of an Attack is dropped and counted). An argument's noun is
the gloss of the noun most annotators chose; it is kept when some annotator filled the role or it has a box. An
unmapped verb gives a negative (no event), or no record when negatives are not kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmpl_ds.errors import UserError
from rmpl_ds.ontology import IMAGE_ROLES, VerbMapping, imsitu_verb_mappings
from rmpl_ds.records import ImageEvent, ImageRecord, VisualArgument
from rmpl_ds.sources.base import (
    IMAGE_SIZE_MISMATCH,
    MISSING_FIELD,
    UNGROUNDED_BOX,
    UNKNOWN_ROLE,
    UNKNOWN_VERB,
    WRONG_TYPE,
    Conversion,
    ImageChecker,
    Problems,
    RecordError,
    check_box,
    count_records,
    describe,
    get,
    get_list,
    input_files,
    json_kind,
    load_json,
    sorted_counter,
    split_from_name,
)

IMSITU = "imsitu"
SWIG = "swig"
SPACE_FILE_NAME = "imsitu_space.json"


class _Space:
    """The parts of imsitu_space.json we use: verb -> its roles, noun id -> first gloss."""

    def __init__(self, verbs: dict[str, tuple[str, ...]] | None, glosses: dict[str, str]) -> None:
        self.verbs = verbs
        self.glosses = glosses

    @classmethod
    def parse(cls, space: Mapping[str, Any]) -> _Space:
        verbs: dict[str, tuple[str, ...]] = {}
        for verb, entry in space["verbs"].items():
            order = entry.get("order") if isinstance(entry, dict) else None
            roles = entry.get("roles") if isinstance(entry, dict) else None
            verbs[verb] = tuple(order) if isinstance(order, list) else tuple(roles or ())
        glosses = {}
        for noun, entry in space["nouns"].items():
            gloss = entry.get("gloss") if isinstance(entry, dict) else None
            if isinstance(gloss, list) and gloss and isinstance(gloss[0], str):
                glosses[noun] = gloss[0]
        return cls(verbs, glosses)


def _is_space(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("verbs"), dict) and isinstance(obj.get("nouns"), dict)


class _Converter:
    def __init__(self, space: _Space, images: ImageChecker | None, keep_negatives: bool) -> None:
        self.space = space
        self.images = images
        self.keep_negatives = keep_negatives
        self.mappings = imsitu_verb_mappings()
        self.unmapped_verbs: Counter[str] = Counter()
        self.dropped_roles: Counter[str] = Counter()
        self.unknown_nouns: set[str] = set()
        self.negatives_dropped = 0

    def record(self, key: str, value: Any, split: str, file_format: str) -> ImageRecord | None:
        """One checked record, or None for an unmapped verb when negatives are not kept."""
        verb = get(value, "verb", str)
        if self.space.verbs is not None and verb not in self.space.verbs:
            raise RecordError(UNKNOWN_VERB, f"verb {verb!r} is not in {SPACE_FILE_NAME}", "verb")
        frames = get_list(value, "frames", dict)
        verb_roles = self.space.verbs[verb] if self.space.verbs is not None else None
        for number, frame in enumerate(frames):
            self._check_frame(frame, verb, verb_roles, f"frames[{number}]")
        roles = verb_roles if verb_roles is not None else tuple(dict.fromkeys(r for f in frames for r in f))
        width = height = 0
        boxes: dict[str, Any] = {}
        if file_format == SWIG:
            width = get(value, "width", int)
            height = get(value, "height", int)
            if width <= 0 or height <= 0:
                raise RecordError(WRONG_TYPE, f"expected a positive image size, found {width}x{height}", "width")
            boxes = get(value, "bb", dict)
            for role, box in boxes.items():
                if role not in roles:
                    raise RecordError(UNKNOWN_ROLE, f"verb {verb!r} has no role {role!r}", f"bb.{role}")
                if not (isinstance(box, list) and tuple(box) == UNGROUNDED_BOX):
                    check_box(box, f"bb.{role}", width, height)
        if self.images is not None:
            size = self.images.size(key, split)
            if file_format == SWIG and size != (width, height):
                raise RecordError(
                    IMAGE_SIZE_MISMATCH,
                    f"the image is {size[0]}x{size[1]}, the boxes are for {width}x{height} (use SWiG's images_512)",
                )
            width, height = size
        mapping = self.mappings.get(verb)
        if mapping is None:
            self.unmapped_verbs[verb] += 1
            if not self.keep_negatives:
                self.negatives_dropped += 1
                return None
            events: tuple[ImageEvent, ...] = ()
        else:
            events = (ImageEvent(mapping.event_type, self._arguments(mapping, roles, frames, boxes), verb=verb),)
        source = SWIG if file_format == SWIG else IMSITU
        return ImageRecord(key, source, split, key, width, height, events)

    def _check_frame(self, frame: dict[str, Any], verb: str, verb_roles: tuple[str, ...] | None, path: str) -> None:
        for role, noun in frame.items():
            if not isinstance(noun, str):
                raise RecordError(WRONG_TYPE, f'expected a noun id or "", found {describe(noun)}', f"{path}.{role}")
            if verb_roles is not None and role not in verb_roles:
                raise RecordError(UNKNOWN_ROLE, f"verb {verb!r} has no role {role!r}", f"{path}.{role}")
        if verb_roles is not None:
            for role in verb_roles:
                if role not in frame:
                    raise RecordError(MISSING_FIELD, f"the frame lacks role {role!r} of verb {verb!r}", path)

    def _arguments(
        self, mapping: VerbMapping, roles: tuple[str, ...], frames: list[dict[str, str]], boxes: dict[str, Any]
    ) -> tuple[VisualArgument, ...]:
        arguments = []
        for role in roles:
            m2e2_role = mapping.roles.get(role)
            if m2e2_role is None:
                continue
            if m2e2_role not in IMAGE_ROLES[mapping.event_type]:
                self.dropped_roles[m2e2_role] += 1
                continue
            # Majority vote over the annotators; Counter.most_common keeps first-seen order on ties.
            votes = Counter(frame.get(role, "") for frame in frames if frame.get(role, ""))
            noun_id = votes.most_common(1)[0][0] if votes else ""
            raw_box = boxes.get(role)
            box = None if raw_box is None or tuple(raw_box) == UNGROUNDED_BOX else tuple(raw_box)
            if not noun_id and box is None:
                continue
            if noun_id and noun_id not in self.space.glosses:
                self.unknown_nouns.add(noun_id)
            arguments.append(VisualArgument(m2e2_role, box, noun=self.space.glosses.get(noun_id, "")))
        return tuple(arguments)


def _convert(
    registry_name: str,
    input_path: str | Path,
    images_dir: str | Path | None,
    strict: bool,
    keep_negatives: bool,
) -> Conversion:
    problems = Problems(strict)
    path = Path(input_path)
    files = input_files(path, (".json",))
    split_files: list[tuple[Path, Any]] = []
    space_obj: Any = None
    for file in files:
        obj = load_json(file)
        if _is_space(obj):
            space_obj = obj
        else:
            split_files.append((file, obj))
    if space_obj is None and path.is_file() and (path.parent / SPACE_FILE_NAME).is_file():
        space_obj = load_json(path.parent / SPACE_FILE_NAME)
    space = _Space.parse(space_obj) if _is_space(space_obj) else _Space(None, {})
    converter = _Converter(space, ImageChecker(images_dir) if images_dir is not None else None, keep_negatives)
    records: list[ImageRecord] = []
    formats: dict[str, str] = {}
    for file, obj in split_files:
        if not isinstance(obj, dict):
            raise UserError(f"{file}: expected a JSON object keyed by image file name, found {json_kind(obj)}")
        # SWiG records carry boxes and the image size; imSitu records never do. Decided per file, by content.
        file_format = SWIG if any(isinstance(v, dict) and "bb" in v for v in obj.values()) else IMSITU
        formats[file.name] = file_format
        split = split_from_name(file)
        for key, value in obj.items():
            try:
                record = converter.record(key, value, split, file_format)
            except RecordError as problem:
                problems.report_problem(file, repr(key), problem, key_paths=True)
                continue
            if record is not None:
                records.append(record)
    counts = count_records(records)
    counts.update(
        formats=formats,
        imsitu_space=space.verbs is not None,
        unmapped_verbs=sorted_counter(converter.unmapped_verbs),
        dropped_roles=sorted_counter(converter.dropped_roles),
        unknown_noun_ids=len(converter.unknown_nouns),
        negatives_dropped=converter.negatives_dropped,
    )
    detected = "+".join(sorted(set(formats.values()))) or "none"
    return Conversion(registry_name, detected, list(records), problems.skipped, counts)


def convert_imsitu(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """imSitu (or SWiG) split files -> :class:`~rmpl_ds.records.ImageRecord` records (see the module docstring).

    ``input_path``: a split file or a directory of them (optionally with ``imsitu_space.json``); the split comes
    from the file name. Record ids and image names are the imSitu keys (``hitchhiking_238.jpg``); a record's
    ``source`` is the format its file was detected as. Bad records are skipped (or raise under ``strict``); a
    JSON file that is not UTF-8, does not parse, or (a split file) is not an object raises UserError naming the
    file and line, strict or not: none of its records could be read.
    """
    return _convert(IMSITU, input_path, images_dir, strict, keep_negatives)


def convert_swig(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """SWiG ``SWiG_jsons`` files: the same converter as :func:`convert_imsitu` (SWiG is imSitu plus boxes)."""
    return _convert(SWIG, input_path, images_dir, strict, keep_negatives)
