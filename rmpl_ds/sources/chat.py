"""Chat datasets in the layouts users already have -> :class:`~rmpl_ds.records.ChatRecord`, one per conversation.

Layouts, detected per row from its keys:

* ``openai``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}], "images": [...]}``. A
  content is a string or a list of parts: ``{"type": "text", "text": ...}``; ``{"type": "image"}`` (the row's
  next image from ``images``); ``{"type": "image", "image": PATH}`` (also ``path`` or ``url`` instead of ``image``)
  or ``{"type": "image_url", "image_url": {"url": PATH}}``, an inline image. A string content may hold ``<image>``
  placeholders, each the row's next image (LLaMA-Factory's ``messages`` layout).
* ``sharegpt`` (ShareGPT, LLaMA-Factory): ``{"conversations": [{"from": "human" | "gpt" | "system", "value":
  ...}], "system": ..., "images": [...]}`` with ``<image>`` placeholders in the values (``user`` and ``assistant``
  are accepted as ``from`` too). With a LLaMA-Factory ``dataset_info.json`` in the input directory, the entries with
  ``"formatting": "sharegpt"`` whose ``file_name`` is there are read with the entry's ``columns`` and ``tags``
  (other entries are listed in the counts as ``ignored_entries``, with the reason).
* ``llava``: ShareGPT's turns with the image in ``image`` (a path, or a list of them).

Files: ``.json`` (an array of rows, one document), ``.jsonl`` (a row per line), ``.parquet``, and a directory
written by the ``datasets`` library's ``save_to_disk`` (a Dataset, or a DatasetDict whose splits are its
subdirectories). Parquet and Arrow files are read with pyarrow; nothing is evaluated or unpickled. An image is a
path (relative ones resolve against ``images_dir``, else against the input's folder), a ``data:`` URL, bytes, or
a ``{"bytes", "path"}`` struct as the ``datasets`` Image feature stores it (bytes win); remote URLs are not
fetched. Images are checked and decoded like every source's (rmpl_ds.images) and normalized when the shards are
written (:attr:`Conversion.image_members`): bytes stored in a Parquet or Arrow file are read again from the file
then, so a build never holds a dataset's images in memory.

Records keep every turn and every image in order. A conversation is an optional system turn, then user and
assistant turns alternating, starting with a user turn and ending with an assistant turn; assistant turns are
text. A row that breaks a rule is skipped with its file, row (JSON: key path; JSON Lines: line; Parquet and Arrow:
``row N``) and reason, or stops a ``strict`` build. So is a text holding a registered family's chat or image
marker (``<|im_start|>``, ``<|image_pad|>``, ``<IMG_CONTEXT>``, ...), which would forge turns or images when
tokenized; grounding markers (``<ref>``, ``<box>``) and coordinates are text like any other and pass through as
written.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmpl_ds.errors import UserError
from rmpl_ds.records import ChatPart, ChatRecord, ChatTurn, Record
from rmpl_ds.sources.base import (
    MALFORMED,
    MISSING_FIELD,
    UNREADABLE_IMAGE,
    UNSPLIT,
    WRONG_TYPE,
    Conversion,
    ImageChecker,
    Problems,
    RecordError,
    count_records,
    describe,
    find_image,
    get,
    json_kind,
    load_json,
    read_bytes,
    read_lines,
    split_from_name,
)

SOURCE = "chat"
OPENAI = "openai"
SHAREGPT = "sharegpt"
LLAVA = "llava"

# Skip reasons (fixed text: the manifest counts by reason).
UNKNOWN_LAYOUT = "not a conversation"
UNSUPPORTED_ROLE = "unsupported role"
UNSUPPORTED_PART = "unsupported content part"
TURN_ORDER = "turns out of order"
EMPTY_TURN = "empty turn"
IMAGE_COUNT = "image count differs from the placeholders"
ASSISTANT_IMAGE = "image in an assistant turn"
TOO_MANY_IMAGES = "too many images"
REMOTE_IMAGE = "remote image not fetched"
VIDEO = "video not supported"
SPECIAL_TOKEN = "chat or image marker in text"

IMAGE_PLACEHOLDER = "<image>"
# Shard members are `{key}.{index}.{ext}` in USTAR's 100-byte names; far above any real conversation.
MAX_IMAGES = 64
SUFFIXES = (".json", ".jsonl", ".parquet")
LLAMA_FACTORY_INFO = "dataset_info.json"
# What save_to_disk writes: a Dataset directory has state.json (its Arrow files), a DatasetDict dataset_dict.json.
HF_STATE = "state.json"
HF_DICT = "dataset_dict.json"
ROLES = ("system", "user", "assistant")
_BATCH_ROWS = 64
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Tags:
    """How a ShareGPT-style file names its columns and roles (LLaMA-Factory's ``columns`` and ``tags``)."""

    messages: str = "conversations"
    images: str | None = "images"
    system: str | None = "system"
    videos: str | None = "videos"
    role: str = "from"
    content: str = "value"
    roles: Mapping[str, str] = field(
        default_factory=lambda: {
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "system": "system",
        }
    )


LLAVA_TAGS = Tags(images="image")


def convert(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """Chat files (see the module docstring) -> :class:`ChatRecord` records, one per conversation.

    ``input_path``: a file, a directory of ``.json`` / ``.jsonl`` / ``.parquet`` files (with or without a
    LLaMA-Factory ``dataset_info.json``), or a ``save_to_disk`` directory. The split comes from a file name
    (``train.jsonl`` -> ``train``) or a DatasetDict's split names, else ``all``. Record ids are
    ``<file>-<row>`` (JSON: the array index; JSON Lines: the line number; Parquet, Arrow: the row from 0).
    ``keep_negatives`` does not apply (a conversation has no negatives).

    Raises:
        UserError: a missing input, a directory with nothing to read, a JSON file that does not parse or is not
            an array, a Parquet or Arrow file pyarrow cannot open, an unusable ``dataset_info.json``;
            :class:`~rmpl_ds.sources.base.SourceError` for the first bad row under ``strict``.
    """
    path = Path(input_path)
    problems = Problems(strict)
    base = Path(images_dir) if images_dir is not None else (path if path.is_dir() else path.parent)
    builder = _Builder(problems, ImageChecker(base), base)
    ignored: dict[str, str] = {}
    for unit in _units(path, ignored):
        unit.read(builder)
    counts = count_records(builder.records)
    counts.update(builder.counts())
    if ignored:
        counts["ignored_entries"] = dict(sorted(ignored.items()))
    detected = "+".join(sorted(set(builder.formats.values()))) or "none"
    return Conversion(
        SOURCE, detected, list(builder.records), problems.skipped, counts, image_members=builder.image_members
    )


# --------------------------------------------------------------------------------------------- inputs


class _Unit:
    """One input file (or Arrow file) and how to read it."""

    def __init__(self, path: Path, label: str, split: str, tags: Tags | None = None) -> None:
        self.path = path
        self.label = label  # the file as record ids and messages name it
        self.split = split
        self.tags = tags  # a LLaMA-Factory entry's columns and tags; None: detect per row

    def read(self, builder: _Builder) -> None:
        suffix = self.path.suffix.lower()
        if suffix == ".json":
            self._read_json(builder)
        elif suffix == ".jsonl":
            self._read_jsonl(builder)
        else:
            table = _Table(self.path, "parquet" if suffix == ".parquet" else "arrow")
            for row_number, row in table.rows():
                builder.add(self, row, f"row {row_number}", row_number, key_paths=False, table=table)

    def _read_json(self, builder: _Builder) -> None:
        data = load_json(self.path)
        if not isinstance(data, list):
            raise UserError(f"{self.path}: expected a JSON array of conversations, found {json_kind(data)}")
        for index, row in enumerate(data):
            builder.add(self, row, f"[{index}]", index, key_paths=True)

    def _read_jsonl(self, builder: _Builder) -> None:
        for line_number, line in read_lines(self.path, builder.problems):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                builder.problems.report(
                    self.path, str(line_number), MALFORMED, f"invalid JSON: {exc.msg} (column {exc.colno})"
                )
                continue
            except RecursionError:
                builder.problems.report(self.path, str(line_number), MALFORMED, "invalid JSON: nested too deeply")
                continue
            builder.add(self, row, str(line_number), line_number, key_paths=False)


def _units(path: Path, ignored: dict[str, str]) -> list[_Unit]:
    """What to read under ``path``, in order; UserError when there is nothing."""
    if path.is_file():
        if not path.name.lower().endswith((*SUFFIXES, ".arrow")):
            raise UserError(f"{path}: expected a .json, .jsonl, .parquet or .arrow file")
        return [_Unit(path, path.name, split_from_name(path))]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or directory")
    if (path / HF_DICT).is_file():
        return _dataset_dict_units(path)
    if (path / HF_STATE).is_file():
        return _dataset_units(path, path.name, UNSPLIT)
    info = path / LLAMA_FACTORY_INFO
    if info.is_file():
        return _llama_factory_units(path, info, ignored)
    files = sorted(child for child in path.iterdir() if child.is_file() and child.name.lower().endswith(SUFFIXES))
    if not files:
        raise UserError(
            f"{path}: no chat files (*.json, *.jsonl, *.parquet), dataset_info.json or save_to_disk directory"
        )
    return [_Unit(child, child.name, split_from_name(child)) for child in files]


def _dataset_units(directory: Path, label: str, split: str) -> list[_Unit]:
    """The Arrow files of a ``save_to_disk`` Dataset directory, in the order its ``state.json`` lists them."""
    state_path = directory / HF_STATE
    state = load_json(state_path)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise UserError(f"{state_path}: expected '_data_files', the list of the dataset's Arrow files")
    units = []
    for number, entry in enumerate(files):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".arrow"):
            raise UserError(
                f"{state_path}: _data_files[{number}]: expected {{'filename': 'NAME.arrow'}}, got {entry!r}"
            )
        if not (directory / name).is_file():
            raise UserError(f"{directory / name}: missing (listed in {state_path})")
        units.append(_Unit(directory / name, f"{label}/{name}", split))
    if split == UNSPLIT and isinstance(state.get("_split"), str):
        named = split_from_name(state["_split"])
        units = [_Unit(unit.path, unit.label, named) for unit in units]
    return units


def _dataset_dict_units(directory: Path) -> list[_Unit]:
    info_path = directory / HF_DICT
    info = load_json(info_path)
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, list) or not all(isinstance(name, str) and name for name in splits):
        raise UserError(f"{info_path}: expected 'splits', a list of split names")
    units = []
    for name in splits:
        if Path(name).name != name or not (directory / name / HF_STATE).is_file():
            raise UserError(f"{directory / name}: split {name!r} of {info_path} is not a save_to_disk directory")
        units += _dataset_units(
            directory / name, name, split_from_name(name) if split_from_name(name) != UNSPLIT else name
        )
    return units


def _llama_factory_units(directory: Path, info_path: Path, ignored: dict[str, str]) -> list[_Unit]:
    """The ShareGPT entries of a LLaMA-Factory ``dataset_info.json`` whose files are in ``directory``."""
    info = load_json(info_path)
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: expected an object of dataset entries, found {json_kind(info)}")
    units: list[_Unit] = []
    seen: set[Path] = set()
    for name, entry in info.items():
        if not isinstance(entry, dict):
            raise UserError(f"{info_path}: {name!r}: expected an object, found {json_kind(entry)}")
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not (directory / file_name).is_file():
            ignored[name] = "no local file_name" if not isinstance(file_name, str) else f"{file_name} not found"
            continue
        formatting = entry.get("formatting", "alpaca")
        if formatting != "sharegpt" or entry.get("ranking"):
            ignored[name] = (
                "preference data" if entry.get("ranking") else f"formatting {formatting} is not a conversation"
            )
            continue
        file_path = directory / file_name
        if file_path in seen:
            continue
        if not file_path.name.lower().endswith(SUFFIXES):
            ignored[name] = f"{file_name}: not a .json, .jsonl or .parquet file"
            continue
        seen.add(file_path)
        units.append(_Unit(file_path, file_name, split_from_name(file_path), _entry_tags(info_path, name, entry)))
    if not units:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(ignored.items()))
        raise UserError(f"{info_path}: no ShareGPT entry with a local file to read ({reasons or 'no entries'})")
    return units


def _entry_tags(info_path: Path, name: str, entry: Mapping[str, Any]) -> Tags:
    columns = entry.get("columns", {})
    tags = entry.get("tags", {})
    for key, value in (("columns", columns), ("tags", tags)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise UserError(f"{info_path}: {name}.{key}: expected an object of strings, got {value!r}")
    roles = {
        tags.get("user_tag", "human"): "user",
        tags.get("assistant_tag", "gpt"): "assistant",
        tags.get("system_tag", "system"): "system",
    }
    return Tags(
        messages=columns.get("messages", "conversations"),
        images=columns.get("images"),
        system=columns.get("system"),
        videos=columns.get("videos"),
        role=tags.get("role_tag", "from"),
        content=tags.get("content_tag", "value"),
        roles=roles,
    )


class _Table:
    """A Parquet or Arrow (``save_to_disk``) file: its rows in batches, and one cell read again by row."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._cached: tuple[int, int, Any] | None = None  # (first row, rows, pyarrow table) of the last part read
        self._starts: list[int] | None = None

    def rows(self) -> Iterator[tuple[int, Any]]:
        number = 0
        for batch in self._batches():
            for row in batch.to_pylist():
                yield number, row
                number += 1

    def _batches(self) -> Iterator[Any]:
        try:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                yield from pq.ParquetFile(self.path).iter_batches(batch_size=_BATCH_ROWS)
            else:
                yield from self._arrow_table().to_batches(max_chunksize=_BATCH_ROWS)
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise UserError(f"{self.path}: not a readable {self.kind} file: {_first_line(exc)}") from None

    def _arrow_table(self) -> Any:
        import pyarrow as pa

        source = pa.memory_map(str(self.path))  # zero-copy: columns point into the mapped file
        try:
            return pa.ipc.open_stream(source).read_all()  # what save_to_disk writes
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()

    def cell(self, row: int, column: str) -> Any:
        """The value of ``column`` in row ``row``; reads the Parquet row group (cached) or the mapped Arrow file."""
        try:
            if self._cached is None or not self._cached[0] <= row < self._cached[0] + self._cached[1]:
                self._cached = self._part(row)
            first, _, table = self._cached
            return table.column(column)[row - first].as_py()
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"{self.path}: row {row}, column {column!r}: cannot read it again: {_first_line(exc)}"
            ) from None

    def _part(self, row: int) -> tuple[int, int, Any]:
        if self.kind != "parquet":
            table = self._arrow_table()
            return 0, table.num_rows, table
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        if self._starts is None:
            starts, total = [], 0
            for group in range(parquet.num_row_groups):
                starts.append(total)
                total += parquet.metadata.row_group(group).num_rows
            self._starts = starts
        group = max(index for index, start in enumerate(self._starts) if start <= row)
        table = parquet.read_row_group(group)
        return self._starts[group], table.num_rows, table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _ImageSource:
    """Where one image of a record is: a file, bytes in memory (``data:`` URLs), or a cell of a table."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    table: _Table | None = None
    row: int = 0
    key_path: tuple[str | int, ...] = ()

    def read(self) -> bytes:
        if self.path is not None:
            return read_bytes(self.path)
        if self.data is not None:
            return self.data
        assert self.table is not None
        value = self.table.cell(self.row, str(self.key_path[0]))
        for step in self.key_path[1:]:
            value = value[step]
        data = _embedded_bytes(value)
        if data is None:
            raise UserError(f"{self.table.path}: row {self.row}: the image {self.name} has no bytes any more")
        return data


# A turn while it is parsed: (role, segments, key path); a segment is ("text", str) or ("image", value or None,
# key path), None meaning "the row's next image".
_Segment = tuple[Any, ...]
_Turn = tuple[str, list[_Segment], str]
# A listed image of a row (its images column): the value and its key path in the row.
_Listed = tuple[Any, tuple[str | int, ...]]


class _Builder:
    """Turns rows into records, collecting skips, counts and where each record's images are."""

    def __init__(self, problems: Problems, images: ImageChecker, base: Path) -> None:
        self.problems = problems
        self.images = images
        self.base = base
        self.records: list[ChatRecord] = []
        self.formats: dict[str, str] = {}
        self.sources: dict[str, list[_ImageSource]] = {}
        self._decoded: dict[int, str | None] = {}
        self._markers = _markers()

    def add(
        self, unit: _Unit, row: Any, location: str, number: int, *, key_paths: bool, table: _Table | None = None
    ) -> None:
        try:
            layout, tags = _layout(row, unit.tags)
            self.formats.setdefault(unit.label, layout)
            record, sources = self._record(row, unit, number, tags, table)
        except RecordError as problem:
            self.problems.report_problem(unit.path, location, problem, key_paths=key_paths)
            return
        self.records.append(record)
        self.sources[record.id] = sources

    def _record(
        self, row: Mapping[str, Any], unit: _Unit, number: int, tags: Tags | None, table: _Table | None
    ) -> tuple[ChatRecord, list[_ImageSource]]:
        turns, listed, listed_path = _openai_turns(row) if tags is None else _sharegpt_turns(row, tags)
        _check_structure(turns, self._markers)
        placeholders = sum(
            1 for _, segments, _ in turns for segment in segments if segment[0] == "image" and segment[1] is None
        )
        if placeholders != len(listed):
            raise RecordError(
                IMAGE_COUNT,
                f"{placeholders} image placeholder(s) ({IMAGE_PLACEHOLDER} or image parts) for {len(listed)} "
                "listed image(s)",
                listed_path,
            )
        if len(listed) + sum(1 for _, segments, _ in turns for s in segments if s[0] == "image") > MAX_IMAGES:
            raise RecordError(TOO_MANY_IMAGES, f"more than {MAX_IMAGES} images in one conversation")
        origin = f"{unit.label}:{number}"
        remaining = iter(listed)
        record_turns: list[ChatTurn] = []
        sources: list[_ImageSource] = []
        for role, segments, _ in turns:
            parts: list[ChatPart] = []
            for segment in segments:
                if segment[0] == "text":
                    parts.append(ChatPart(text=segment[1]))
                    continue
                value, steps = next(remaining) if segment[1] is None else (segment[1], segment[2])
                sources.append(self._image(value, steps, origin, table, number))
                parts.append(ChatPart(image=len(sources) - 1))
            record_turns.append(ChatTurn(role, tuple(parts)))
        images = tuple(source.name for source in sources)
        return ChatRecord(f"{unit.label}-{number}", SOURCE, unit.split, tuple(record_turns), images), sources

    def _image(
        self, value: Any, steps: tuple[str | int, ...], origin: str, table: _Table | None, number: int
    ) -> _ImageSource:
        """The image ``value`` (at key path ``steps`` of its row), checked to exist and decode."""
        path = _key_text(steps)
        data = _embedded_bytes(value)
        if data is not None:
            hint = value.get("path") if isinstance(value, dict) else None
            name = hint if isinstance(hint, str) and hint else f"{origin}:{path}"
            self._check_bytes(data, path)
            if table is not None:  # read again from the file when the shard is written
                return _ImageSource(name, table=table, row=number, key_path=steps)
            return _ImageSource(name, data=data)
        reference = value.get("path") if isinstance(value, dict) else value
        if not isinstance(reference, str) or not reference:
            raise RecordError(
                WRONG_TYPE, f"expected an image path, bytes or {{bytes, path}}, found {describe(value)}", path
            )
        if reference.startswith("data:"):
            data = _data_url_bytes(reference, path)
            self._check_bytes(data, path)
            return _ImageSource(f"{origin}:{path}", data=data)
        if reference.startswith(("http://", "https://")):
            raise RecordError(REMOTE_IMAGE, f"{reference} (download the images and give their paths)", path)
        name = reference.removeprefix("file://")
        self.images.size(name, path=path)  # raises RecordError: image not found, unreadable image
        found = find_image(self.base, name)
        assert found is not None  # size() just found it
        return _ImageSource(name, path=found)

    def _check_bytes(self, data: bytes, path: str) -> None:
        from rmpl_ds.images import DEFAULT_MAX_PIXELS, ImageError, load_image

        try:
            load_image(data, max_pixels=DEFAULT_MAX_PIXELS, name="image bytes")
        except ImageError as exc:
            raise RecordError(UNREADABLE_IMAGE, str(exc), path) from None

    def image_members(self, record: Record) -> list[tuple[str, bytes]]:
        """The normalized image members of ``record``, in order: ``(extension, bytes)``, ``png`` for a PNG original,
        else ``jpg`` (rmpl_ds.images.encode_image: pixels only, fixed settings)."""
        from rmpl_ds.images import ImageError, encode_image, load_image

        members = []
        for source in self.sources.get(getattr(record, "id", ""), []):
            data = source.read()
            try:
                image = load_image(data, name=source.name)
            except ImageError as exc:
                raise UserError(f"{record.id}: {exc} (it decoded when the records were converted)") from None
            if data.startswith(_PNG_MAGIC):
                members.append(("png", encode_image(image, "png")))
            else:
                members.append(("jpg", encode_image(image, "jpeg")))
        return members

    def counts(self) -> dict[str, Any]:
        turns = Counter(sum(turn.role == "assistant" for turn in record.turns) for record in self.records)
        images = Counter(len(record.images) for record in self.records)
        return {
            "formats": dict(sorted(self.formats.items())),
            "by_assistant_turns": {str(n): turns[n] for n in sorted(turns)},
            "by_images": {str(n): images[n] for n in sorted(images)},
            "images": sum(len(record.images) for record in self.records),
            "with_system": sum(1 for record in self.records if record.turns and record.turns[0].role == "system"),
        }


def _key_text(steps: Sequence[str | int]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def _layout(row: Any, tags: Tags | None) -> tuple[str, Tags | None]:
    """(layout name, ShareGPT tags or None for OpenAI messages) of a row; RecordError when it is neither."""
    if not isinstance(row, dict):
        raise RecordError(WRONG_TYPE, f"expected an object, found {describe(row)}")
    if tags is not None:
        return SHAREGPT, tags
    if "messages" in row:
        return OPENAI, None
    if "conversations" in row:
        if "image" in row and "images" not in row:
            return LLAVA, LLAVA_TAGS
        return SHAREGPT, Tags()
    raise RecordError(
        UNKNOWN_LAYOUT, f"no 'messages' (OpenAI) or 'conversations' (ShareGPT, LLaVA) key; keys {sorted(row)[:8]}"
    )


def _split_placeholders(text: str, path: str) -> list[_Segment]:
    """A text with ``<image>`` placeholders as segments: text pieces and the row's next images."""
    segments: list[_Segment] = []
    for number, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if number:
            segments.append(("image", None, path))
        if piece:
            segments.append(("text", piece))
    return segments


def _listed_images(row: Mapping[str, Any], column: str | None) -> tuple[list[_Listed], str]:
    """The row's listed images with their key paths (a single value counts as a list of one; null or absent:
    none), and the column's name."""
    if column is None or row.get(column) is None:
        return [], column or "images"
    value = row[column]
    if isinstance(value, list):
        return [(item, (column, index)) for index, item in enumerate(value)], column
    return [(value, (column,))], column


def _check_videos(row: Mapping[str, Any], column: str | None) -> None:
    if column and row.get(column):
        raise RecordError(VIDEO, f"{len(row[column]) if isinstance(row[column], list) else 1} video(s)", column)


def _openai_turns(row: Mapping[str, Any]) -> tuple[list[_Turn], list[_Listed], str]:
    messages = get(row, "messages", list)
    _check_videos(row, "videos")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = get(message, "role", str, where)
        if role not in ROLES:
            raise RecordError(UNSUPPORTED_ROLE, f"role {role!r}; expected one of {list(ROLES)}", f"{where}.role")
        if "content" not in message:
            raise RecordError(MISSING_FIELD, "missing key 'content'", f"{where}.content")
        content = message["content"]
        if isinstance(content, str):
            turns.append((role, _split_placeholders(content, f"{where}.content"), where))
            continue
        if not isinstance(content, list):
            raise RecordError(
                WRONG_TYPE, f"expected a string or a list of parts, found {describe(content)}", f"{where}.content"
            )
        segments: list[_Segment] = []
        for number, part in enumerate(content):
            part_path = f"{where}.content[{number}]"
            kind = get(part, "type", str, part_path)
            if kind == "text":
                segments += _split_placeholders(get(part, "text", str, part_path), f"{part_path}.text")
            elif kind == "image":
                key = next((name for name in ("image", "path", "url") if part.get(name) is not None), None)
                steps = ("messages", index, "content", number, key)
                segments.append(("image", part[key], steps) if key else ("image", None, part_path))
            elif kind == "image_url":
                url = get(part, "image_url", (dict, str), part_path)
                if isinstance(url, dict):
                    segments.append(
                        (
                            "image",
                            get(url, "url", str, f"{part_path}.image_url"),
                            ("messages", index, "content", number, "image_url", "url"),
                        )
                    )
                else:
                    segments.append(("image", url, ("messages", index, "content", number, "image_url")))
            else:
                raise RecordError(
                    UNSUPPORTED_PART, f"part type {kind!r}; expected text, image or image_url", f"{part_path}.type"
                )
        turns.append((role, segments, where))
    listed, listed_path = _listed_images(row, "images")
    return turns, listed, listed_path


def _sharegpt_turns(row: Mapping[str, Any], tags: Tags) -> tuple[list[_Turn], list[_Listed], str]:
    conversation = get(row, tags.messages, list)
    _check_videos(row, tags.videos)
    turns = []
    system = row.get(tags.system) if tags.system else None
    if system is not None and not isinstance(system, str):
        raise RecordError(WRONG_TYPE, f"expected a string, found {describe(system)}", str(tags.system))
    if system:
        turns.append(("system", _split_placeholders(system, str(tags.system)), str(tags.system)))
    for index, message in enumerate(conversation):
        where = f"{tags.messages}[{index}]"
        name = get(message, tags.role, str, where)
        role = tags.roles.get(name)
        if role is None:
            raise RecordError(
                UNSUPPORTED_ROLE, f"{tags.role} {name!r}; expected one of {sorted(tags.roles)}", f"{where}.{tags.role}"
            )
        text = get(message, tags.content, str, where)
        turns.append((role, _split_placeholders(text, f"{where}.{tags.content}"), where))
    listed, listed_path = _listed_images(row, tags.images)
    return turns, listed, listed_path


def _check_structure(turns: list[_Turn], markers: Sequence[str]) -> None:
    """An optional system turn, then user / assistant alternating from user to assistant; assistant turns are
    non-empty text; user turns are not empty; no text holds a chat or image marker."""
    roles = [role for role, _, _ in turns]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or body != expected or len(body) % 2:
        raise RecordError(
            TURN_ORDER,
            f"roles {roles}; expected an optional system turn, then user and assistant alternating, "
            "ending with an assistant turn",
        )
    for role, segments, where in turns:
        texts = [segment[1] for segment in segments if segment[0] == "text"]
        has_image = any(segment[0] == "image" for segment in segments)
        if role == "assistant" and has_image:
            raise RecordError(ASSISTANT_IMAGE, "assistant turns are text", where)
        if not has_image and not "".join(texts).strip():
            raise RecordError(
                EMPTY_TURN, f"{role} turn with no text" + ("" if role == "assistant" else " or image"), where
            )
        for text in texts:
            marker = next((marker for marker in markers if marker in text), None)
            if marker is not None:
                raise RecordError(SPECIAL_TOKEN, f"{marker!r} in the {role} text", where)


def _markers() -> tuple[str, ...]:
    """The tokens that structure a chat or an image in any registered family: its end of turn, padding, image
    tokens, and every special token its chat template writes. Longest first (one may contain another)."""
    from rmpl_ds.backbones import specs

    markers: set[str] = set()
    for spec in specs():
        markers |= {
            spec.end_of_turn_token,
            spec.pad_token,
            spec.image_token,
            spec.image_start_token,
            spec.image_end_token,
        }
        markers |= {token for token in spec.special_tokens if token in spec.chat_template}
    return tuple(sorted(markers, key=lambda token: (-len(token), token)))


def _embedded_bytes(value: Any) -> bytes | None:
    """The bytes of an embedded image (raw bytes, or the ``bytes`` of a ``{bytes, path}`` struct), else None."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray | memoryview) and value["bytes"]:
        return bytes(value["bytes"])
    return None


def _data_url_bytes(url: str, path: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RecordError(UNREADABLE_IMAGE, f"data URL {header[:40]!r} is not base64 data", path)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(UNREADABLE_IMAGE, "data URL payload is not valid base64", path) from None
