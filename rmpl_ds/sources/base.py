"""What every converter shares: the result type, skip-with-reason bookkeeping, field checks, images, counts.

A converter turns one real dataset (a file or a directory of split files) into unified records
(:mod:`rmpl_ds.records`). A bad record never stops a normal run: the record is skipped and a :class:`Skip` names the
file, the line or key path, a short reason (the manifest groups by it) and the detail, all deterministic text (the
manifest of a rebuild must be byte-identical). Under ``strict`` the first problem raises :class:`SourceError` (a
:class:`~rmpl_ds.errors.UserError`, so the CLI exits 2) with the same text. Mapping decisions (an ACE type M2E2
does not use, an imSitu verb without an M2E2 meaning) are not problems: they are counted in
:attr:`Conversion.counts`.

What counts as one record depends on how a file is read:

* A whole-file format (one JSON document: M2E2, ACE nlpcl-lab/JMEE, imSitu/SWiG) that is not UTF-8, does not parse
  or has the wrong top-level shape holds no readable record at all, so it is an error even in a normal run
  (:class:`~rmpl_ds.errors.UserError` naming the file and the line), never a skip that hides a lost file.
* In a line-oriented file (MNRE, OneIE JSON Lines, ``crossmedia_coref.txt``) each line is one record: a line that
  is not UTF-8 or does not parse is one skip with its line number (:func:`read_lines`).
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rmpl_ds.errors import UserError
from rmpl_ds.records import Box, CrossMediaLink, ImageRecord, Record, RelationPair, TextSentence

# Skip reasons: short and fixed, because the manifest counts skipped records by reason.
MALFORMED = "malformed input"
NOT_UTF8 = "not UTF-8 text"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong field type"
OFFSET_OUTSIDE = "offset outside the sentence"
BAD_BOX = "bad box"
BOX_OUTSIDE = "box outside the image"
UNKNOWN_EVENT_TYPE = "unknown event type"
UNKNOWN_VERB = "unknown verb"
UNKNOWN_ROLE = "unknown role"
UNKNOWN_RELATION = "unknown relation label"
UNKNOWN_ENTITY = "unknown entity id"
DUPLICATE_ID = "duplicate id"
IMAGE_NOT_FOUND = "image not found"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_SIZE_MISMATCH = "image size differs from the annotation"

# File-name words that name a split; everything else about a file name is ignored.
SPLIT_WORDS: dict[str, str] = {
    "train": "train",
    "training": "train",
    "dev": "dev",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
UNSPLIT = "all"

# SWiG's marker for a role that has no box.
UNGROUNDED_BOX = (-1, -1, -1, -1)


@dataclass(frozen=True)
class Skip:
    """A record left out: where it is, why (one of the reason constants above), and the specifics."""

    file: str
    line_or_key: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line_or_key}" if self.line_or_key else self.file
        return f"{where}: {self.reason}: {self.detail}" if self.detail else f"{where}: {self.reason}"


class SourceError(UserError):
    """Raised under ``strict`` for the first bad record; ``skip`` says where and why."""

    def __init__(self, skip: Skip) -> None:
        self.skip = skip
        super().__init__(str(skip))


@dataclass
class Conversion:
    """What a converter returns.

    Attributes:
        source: the registry name the converter was called under (``ace``, ``imsitu``, ``swig``, ``mnre``, ``m2e2``,
            ``chat``).
        format: the on-disk format detected from the content (``nlpcl-lab``, ``jmee``, ``oneie``, ``imsitu``,
            ``swig``, ``mnre-v2``, ``mnre-v1``, ``m2e2``, ``openai``, ``sharegpt``, ``llava``); several formats in
            one input are joined with ``+``.
        records: the unified records, in input order (files sorted by name).
        skipped: every record left out, with its reason.
        counts: :func:`count_records` of ``records`` plus converter-specific counts (dropped types and roles, ...).
        image_members: for a source whose images are not files under ``--images`` (chat: paths resolved against
            the input, bytes inside Parquet or Arrow files), ``record -> [(extension, normalized bytes), ...]``
            in the record's image order; ``shards build`` stores them as members ``0.jpg``, ``1.png``, ...
    """

    source: str
    format: str
    records: list[Record]
    skipped: list[Skip] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    image_members: Callable[[Record], list[tuple[str, bytes]]] | None = None


class Converter(Protocol):
    """``convert(input_path, *, images_dir=None, strict=False, keep_negatives=True) -> Conversion``.

    ``images_dir``: when given, every record that refers to an image is checked against it: the file must exist
    (else :data:`IMAGE_NOT_FOUND`) and decode through :func:`rmpl_ds.images.load_image` (else
    :data:`UNREADABLE_IMAGE`); the record's width and height become the decoded, upright size, and its boxes must
    lie inside it. Without it nothing is opened, sizes are what the annotation says (0 when it says nothing), and
    boxes are only checked for shape. ``keep_negatives``: keep records with no M2E2 event / no relation (True) or
    leave them out (counted, not skipped). Raises :class:`SourceError` under ``strict``, :class:`UserError` for an
    input path that is missing or holds no input file.
    """

    def __call__(
        self,
        input_path: str | Path,
        *,
        images_dir: str | Path | None = None,
        strict: bool = False,
        keep_negatives: bool = True,
    ) -> Conversion: ...


class RecordError(Exception):
    """Internal: one record is bad. ``path`` is the key path inside the record (e.g. ``trigger.end``)."""

    def __init__(self, reason: str, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.path = path


class Problems:
    """Collects skips, or raises the first one under ``strict``."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: list[Skip] = []

    def report(self, file: str | Path, line_or_key: str, reason: str, detail: str = "") -> None:
        skip = Skip(str(file), line_or_key, reason, detail)
        if self.strict:
            raise SourceError(skip)
        self.skipped.append(skip)

    def report_problem(self, file: str | Path, location: str, problem: RecordError, *, key_paths: bool) -> None:
        """Report ``problem`` found in the record at ``location``.

        ``key_paths``: the location is a key path (``[3]``, ``"img.jpg"``) that the problem's own path extends;
        otherwise it is a line number and the path goes into the detail.
        """
        if key_paths:
            where = join_path(location, problem.path)
            self.report(file, where, problem.reason, problem.detail)
        else:
            detail = f"{problem.path}: {problem.detail}" if problem.path else problem.detail
            self.report(file, location, problem.reason, detail)


def join_path(*parts: str) -> str:
    """Join key-path parts: ``join_path("[3]", "trigger", "end") == "[3].trigger.end"``; list indices stay glued."""
    joined = ""
    for part in parts:
        if not part:
            continue
        if not joined or part.startswith("["):
            joined += part
        else:
            joined += "." + part
    return joined


# --- field checks (raise RecordError) -----------------------------------------------------------------------


def describe(value: Any) -> str:
    """A short "what was found" for error messages; the same value always gives the same text (see stable_repr)."""
    text = stable_repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def stable_repr(value: Any) -> str:
    """``repr`` with the items of every set sorted.

    A set of strings iterates in an order that depends on string hashing, which changes from process to process
    (MNRE lines are Python literals, so a line can hold a set); a skip reason must not.
    """
    if isinstance(value, set | frozenset):
        if not value:
            return repr(value)
        body = "{" + ", ".join(sorted(stable_repr(item) for item in value)) + "}"
        return body if isinstance(value, set) else f"frozenset({body})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{stable_repr(key)}: {stable_repr(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(stable_repr(item) for item in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(stable_repr(item) for item in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (``an object``, ``an array``, ...), for file-shape errors."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def get(obj: Mapping[str, Any], key: str, expected: type | tuple[type, ...], path: str = "") -> Any:
    """``obj[key]`` checked to be of type ``expected`` (bool never counts as int)."""
    key_path = join_path(path, key)
    if not isinstance(obj, Mapping):
        raise RecordError(WRONG_TYPE, f"expected an object, found {describe(obj)}", path)
    if key not in obj:
        raise RecordError(MISSING_FIELD, f"missing key {key!r}", key_path)
    value = obj[key]
    if not is_type(value, expected):
        raise RecordError(WRONG_TYPE, f"expected {type_names(expected)}, found {describe(value)}", key_path)
    return value


def is_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in expected_types:
        return False
    return isinstance(value, expected_types)


def type_names(expected: type | tuple[type, ...]) -> str:
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "int", str: "string", list: "list", dict: "object", float: "number"}
    return " or ".join(names.get(kind, kind.__name__) for kind in expected_types)


def get_list(obj: Mapping[str, Any], key: str, item_type: type, path: str = "") -> list[Any]:
    """``obj[key]`` checked to be a list whose items are all of ``item_type``."""
    values = get(obj, key, list, path)
    for index, value in enumerate(values):
        if not is_type(value, item_type):
            item_path = join_path(path, key, f"[{index}]")
            raise RecordError(WRONG_TYPE, f"expected {type_names(item_type)}, found {describe(value)}", item_path)
    return values


def token_span(obj: Mapping[str, Any], n_tokens: int, path: str = "") -> tuple[int, int]:
    """The end-exclusive token span ``obj["start"], obj["end"]``, checked to be non-empty and inside the sentence."""
    start = get(obj, "start", int, path)
    end = get(obj, "end", int, path)
    return check_span(start, end, n_tokens, path)


def check_span(start: int, end: int, n_tokens: int, path: str = "") -> tuple[int, int]:
    if not 0 <= start < end <= n_tokens:
        raise RecordError(
            OFFSET_OUTSIDE, f"span [{start}, {end}) is empty or outside the sentence of {n_tokens} tokens", path
        )
    return start, end


def check_box(value: Any, path: str, width: int = 0, height: int = 0) -> Box:
    """A ``[x1, y1, x2, y2]`` pixel box: ints, x1 <= x2, y1 <= y2, not negative, inside ``width`` x ``height``.

    A zero ``width`` / ``height`` means the image size is unknown, so only the shape is checked. Equal corners are
    allowed because SWiG counts pixels inclusively (a one-pixel-wide box has x1 == x2).
    """
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(is_type(v, int) for v in value):
        raise RecordError(WRONG_TYPE, f"expected [x1, y1, x2, y2] as 4 ints, found {describe(value)}", path)
    x1, y1, x2, y2 = value
    if min(x1, y1) < 0 or x2 < x1 or y2 < y1:
        raise RecordError(BAD_BOX, f"box {list(value)} is not x1 <= x2, y1 <= y2 with non-negative corners", path)
    if width and height and (x2 > width or y2 > height):
        raise RecordError(BOX_OUTSIDE, f"box {list(value)} lies outside the {width}x{height} image", path)
    return (x1, y1, x2, y2)


# --- inputs ---------------------------------------------------------------------------------------------------


def input_files(
    input_path: str | Path, suffixes: tuple[str, ...], *, exclude: Callable[[Path], bool] | None = None
) -> list[Path]:
    """The input files: ``input_path`` itself, or its files with one of ``suffixes`` (sorted, not recursive).

    Raises UserError when the path does not exist or a directory holds no matching file.
    """
    path = Path(input_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or directory")
    files = sorted(
        child
        for child in path.iterdir()
        if child.is_file() and child.name.lower().endswith(suffixes) and not (exclude and exclude(child))
    )
    if not files:
        raise UserError(f"{path}: no input files ending in {', '.join(suffixes)}")
    return files


def split_from_name(path: str | Path) -> str:
    """The split a file name announces (``mnre_val .txt`` -> ``val``, ``new_train.json`` -> ``train``), else ``all``."""
    for word in re.split(r"[^a-z]+", Path(path).name.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return UNSPLIT


def read_bytes(path: Path) -> bytes:
    """A file's bytes; UserError naming the file when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _without_bom(data: bytes) -> tuple[int, bytes]:
    """(bytes removed, ``data`` without a UTF-8 BOM); ``data_list.csv`` style files carry one."""
    if data.startswith(codecs.BOM_UTF8):
        return len(codecs.BOM_UTF8), data[len(codecs.BOM_UTF8) :]
    return 0, data


def decode_text(path: Path, data: bytes) -> str:
    """A whole file's bytes as UTF-8 text without a BOM.

    Raises UserError ``FILE:LINE: not UTF-8 text (... at byte N)`` (N counted from the start of the file): a
    whole-file format cannot be read around a bad byte, so the file is unusable.
    """
    skipped, body = _without_bom(data)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: {NOT_UTF8} ({exc.reason} at byte {skipped + exc.start})") from None


def read_text(path: Path) -> str:
    """A whole UTF-8 file's text without a BOM (see :func:`decode_text`)."""
    return decode_text(path, read_bytes(path))


def parse_json(path: Path, text: str) -> Any:
    """``text``, a whole file, as one JSON document.

    Raises UserError ``FILE:LINE: invalid JSON: ... (column C)``: a JSON document that does not parse (a truncated
    download, say) holds no readable record, and reporting it as one skipped record would hide the loss of all of
    them.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}); the file must parse as a whole"
        ) from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON: nested too deeply to parse") from None


def load_json(path: Path) -> Any:
    """A whole file as one JSON document (see :func:`decode_text` and :func:`parse_json` for the errors)."""
    return parse_json(path, read_text(path))


def read_lines(path: Path, problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every line of a line-oriented file (see :func:`split_lines`)."""
    return split_lines(path, read_bytes(path), problems)


def split_lines(path: Path, data: bytes, problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every line of ``data``, the bytes of the line-oriented file ``path``.

    Lines end at ``\\n`` (a ``\\r`` before it is dropped, a BOM at the start too), so line numbers are an editor's.
    A line that is not UTF-8 is one bad record: it is reported (:data:`NOT_UTF8`, with its line number; under
    ``strict`` that raises) and left out, and the lines around it are read as usual.
    """
    _, body = _without_bom(data)
    for number, raw in enumerate(body.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            detail = f"{exc.reason}: byte 0x{raw[exc.start]:02x} at offset {exc.start} of the line"
            problems.report(path, str(number), NOT_UTF8, detail)
            continue
        yield number, text


# --- images ---------------------------------------------------------------------------------------------------


def find_image(images_dir: str | Path, name: str, split: str = "") -> Path | None:
    """Where the image ``name`` is: ``images_dir/name``, else ``images_dir/<split>/name`` (MNRE's ``img_org/val``)."""
    root = Path(images_dir)
    candidates = [root / name]
    if split and split != UNSPLIT:
        candidates.append(root / split / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


class ImageChecker:
    """Checks that images exist and decode, once per file (MNRE pairs share images), and reports their size."""

    def __init__(self, images_dir: str | Path, max_pixels: int | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.max_pixels = max_pixels
        self._sizes: dict[Path, tuple[int, int] | str] = {}

    def size(self, name: str, split: str = "", path: str = "") -> tuple[int, int]:
        """The decoded, upright ``(width, height)`` of image ``name``; raises RecordError if missing or unreadable."""
        found = find_image(self.images_dir, name, split)
        if found is None:
            raise RecordError(IMAGE_NOT_FOUND, str(self.images_dir / name), path)
        if found not in self._sizes:
            # Imported here: rmpl_ds.images pulls in numpy, and listing the sources (CLI --help) should not.
            from rmpl_ds.images import DEFAULT_MAX_PIXELS, ImageError, load_image

            try:
                self._sizes[found] = load_image(found, max_pixels=self.max_pixels or DEFAULT_MAX_PIXELS).size
            except ImageError as exc:
                self._sizes[found] = str(exc)
        result = self._sizes[found]
        if isinstance(result, str):
            raise RecordError(UNREADABLE_IMAGE, result, path)
        return result


# --- counts ---------------------------------------------------------------------------------------------------


def count_records(records: Iterable[Record]) -> dict[str, Any]:
    """Counts for the manifest and for tests: by kind, split, event type, role, relation label; negatives, boxes."""
    by_kind: Counter[str] = Counter()
    by_split: Counter[str] = Counter()
    by_event_type: Counter[str] = Counter()
    by_role: Counter[str] = Counter()
    by_relation: Counter[str] = Counter()
    events = arguments = negatives = boxes = ungrounded = 0
    for record in records:
        by_kind[record.kind] += 1
        if isinstance(record, CrossMediaLink):
            continue
        by_split[record.split] += 1
        if isinstance(record, RelationPair):
            by_relation[record.relation] += 1
            continue
        if isinstance(record, TextSentence | ImageRecord):
            negatives += not record.events
            for event in record.events:
                events += 1
                by_event_type[event.event_type] += 1
                for argument in event.arguments:
                    arguments += 1
                    by_role[argument.role] += 1
                    if isinstance(record, ImageRecord):
                        if argument.box is None:
                            ungrounded += 1
                        else:
                            boxes += 1
    counts: dict[str, Any] = {
        "records": sum(by_kind.values()),
        "by_kind": dict(sorted(by_kind.items())),
        "by_split": dict(sorted(by_split.items())),
    }
    if events or negatives:
        counts.update(
            events=events,
            arguments=arguments,
            negatives=negatives,
            by_event_type=dict(sorted(by_event_type.items())),
            by_role=dict(sorted(by_role.items())),
        )
    if boxes or ungrounded:
        counts.update(boxes=boxes, ungrounded_arguments=ungrounded)
    if by_relation:
        counts["by_relation"] = dict(sorted(by_relation.items()))
    return counts


def sorted_counter(counter: Mapping[str, int]) -> dict[str, int]:
    """A counter as a plain dict with sorted keys (manifests must not depend on insertion order)."""
    return dict(sorted(counter.items()))
