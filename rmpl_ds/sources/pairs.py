"""Unlabeled image-caption pairs in the Hugging Face ImageFolder captions layout -> :class:`CaptionPair` records.

The layout (``datasets.load_dataset("imagefolder", data_dir=...)`` reads the same directory)::

    pairs/metadata.jsonl       one JSON object per line: {"file_name": "0001.jpg", "text": "caption ..."}
    pairs/0001.jpg ...         the images, at ``file_name`` relative to the metadata file's folder

``input_path`` is a ``metadata.jsonl`` file or a directory holding one, or holding split folders that each hold one
(``train/metadata.jsonl``, ``test/metadata.jsonl``: ImageFolder's split layout). A line may also carry ``"id"`` (a
string or an integer; default: ``file_name`` relative to the input directory) and ``"document_id"`` (a string);
other keys are ignored, as ImageFolder keeps them as extra columns we do not use. With ``images_dir`` the images are
looked up there (``images_dir/<file_name>``, else ``images_dir/<split>/<file_name>``) instead of beside the metadata.

Split: the split word of the metadata file's name (``metadata_test.jsonl``), else of its folder's name
(``test/metadata.jsonl``), else ``train`` (ImageFolder's name for a single-split directory).

Caption tokens. The caption is split on whitespace; then each piece loses its leading opening quotes and brackets
and its trailing closing punctuation (``. , ; : ! ?``, quotes, brackets), each becoming a token of its own:
``"Police arrested him in Lagos, Nigeria."`` -> ``Police arrested him in Lagos , Nigeria .``. Nothing inside a word
is split (``U.S``, ``don't``, ``500-dollar`` stay whole), and a trailing period stays on a word that has another
period inside (``U.S.``: an abbreviation). That is all: the tokens only need to be the units the caption's
triggers and arguments are written in, and M2E2's own tokenization splits punctuation the same way.

Every line is one record (:func:`~rmpl_ds.sources.base.read_lines`): a line that is not UTF-8 or JSON, not an
object, without a string ``file_name`` or ``text``, with an unsafe ``file_name`` (absolute, ``..``), an empty
caption, an id seen before, or an image that is missing or does not decode is skipped with its file and line
(``strict`` raises instead). Blank lines are not records. The image size is the decoded, upright size.
``keep_negatives`` does not apply: an unlabeled pair is neither positive nor negative.

``shards build --source pairs`` stores each pair's normalized image beside its record as member ``jpg`` (``png``
for a PNG), as image records are stored.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from rmpl_ds.errors import UserError
from rmpl_ds.records import CaptionPair, Record
from rmpl_ds.sources.base import (
    DUPLICATE_ID,
    MALFORMED,
    WRONG_TYPE,
    Conversion,
    ImageChecker,
    Problems,
    RecordError,
    count_records,
    describe,
    get,
    read_lines,
    split_from_name,
)

SOURCE = "pairs"
FORMAT = "imagefolder"
METADATA_NAME = "metadata.jsonl"
DEFAULT_SPLIT = "train"
EMPTY_CAPTION = "empty caption"
UNSAFE_PATH = "unsafe file name"

_OPENING = "\"'([{“‘«"
_CLOSING = ".,;:!?\"')]}”’»"


def tokenize_caption(text: str) -> tuple[str, ...]:
    """The caption's tokens (module docstring): whitespace pieces with outer punctuation split off."""
    tokens: list[str] = []
    for piece in text.split():
        leading: list[str] = []
        while len(piece) > 1 and piece[0] in _OPENING:
            leading.append(piece[0])
            piece = piece[1:]
        trailing: list[str] = []
        while len(piece) > 1 and piece[-1] in _CLOSING:
            if piece[-1] == "." and "." in piece[:-1] and not trailing:
                break  # an abbreviation's period (U.S.)
            trailing.append(piece[-1])
            piece = piece[:-1]
        tokens += [*leading, piece, *reversed(trailing)]
    return tuple(tokens)


def metadata_files(input_path: str | Path) -> list[Path]:
    """The metadata files of ``input_path`` (module docstring), sorted; UserError when there is none."""
    path = Path(input_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or directory")
    found = sorted(
        child
        for child in [*path.glob("*.jsonl"), *path.glob(f"*/{METADATA_NAME}")]
        if child.is_file() and child.name.startswith("metadata")
    )
    if not found:
        raise UserError(
            f"{path}: no {METADATA_NAME} (expected an ImageFolder captions directory: {METADATA_NAME} with "
            '{"file_name": ..., "text": ...} lines and the images beside it, or split folders holding one each)'
        )
    return found


def _split_of(metadata: Path) -> str:
    for name in (metadata.name, metadata.parent.name):
        split = split_from_name(name)
        if split != "all":
            return split
    return DEFAULT_SPLIT


def _file_name(obj: dict[str, Any]) -> str:
    name = get(obj, "file_name", str)
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name.strip() or pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
        raise RecordError(UNSAFE_PATH, f"file_name {name!r} must be a relative path inside the folder", "file_name")
    return pure.as_posix()


def _pair_id(obj: dict[str, Any], default: str) -> str:
    if "id" not in obj:
        return default
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise RecordError(WRONG_TYPE, f"expected a non-empty string or an integer, found {describe(value)}", "id")
    return str(value)


def convert(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """ImageFolder ``metadata.jsonl`` files -> :class:`~rmpl_ds.records.CaptionPair` records (module docstring).

    Returns the records in file then line order, with ``image_members`` giving each record's normalized image for
    ``shards build``. Raises :class:`~rmpl_ds.sources.base.SourceError` under ``strict`` and UserError for an input
    path that is missing or holds no metadata file.
    """
    del keep_negatives  # unlabeled pairs have no negatives
    problems = Problems(strict)
    root = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
    records: list[CaptionPair] = []
    paths: dict[str, Path] = {}
    seen: set[str] = set()
    checkers: dict[Path, ImageChecker] = {}
    for metadata in metadata_files(input_path):
        split = _split_of(metadata)
        folder = Path(images_dir) if images_dir is not None else metadata.parent
        checker = checkers.setdefault(folder, ImageChecker(folder))
        prefix = metadata.parent.relative_to(root).as_posix() if metadata.parent != root else ""
        for line_number, line in read_lines(metadata, problems):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.report(metadata, str(line_number), MALFORMED, f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            try:
                if not isinstance(obj, dict):
                    raise RecordError(WRONG_TYPE, f"expected a JSON object, found {describe(obj)}")
                file_name = _file_name(obj)
                caption = get(obj, "text", str)
                tokens = tokenize_caption(caption)
                if not tokens:
                    raise RecordError(EMPTY_CAPTION, f"text {caption!r} holds no token", "text")
                pair_id = _pair_id(obj, f"{prefix}/{file_name}" if prefix else file_name)
                if pair_id in seen:
                    raise RecordError(DUPLICATE_ID, f"id {pair_id!r} was used by an earlier line", "id")
                document_id = get(obj, "document_id", str) if "document_id" in obj else ""
                width, height = checker.size(file_name, split, "file_name")
            except RecordError as problem:
                problems.report_problem(metadata, str(line_number), problem, key_paths=False)
                continue
            seen.add(pair_id)
            record = CaptionPair(pair_id, SOURCE, split, file_name, width, height, tokens, document_id)
            records.append(record)
            paths[pair_id] = _located(folder, file_name, split)
    counts = count_records(records)
    counts.update(
        images=len(set(paths.values())),
        caption_tokens=sum(len(record.tokens) for record in records),
    )

    def image_members(record: Record) -> list[tuple[str, bytes]]:
        return [_image_member(paths[record.id], record)]  # type: ignore[union-attr]

    return Conversion(SOURCE, FORMAT, list(records), problems.skipped, counts, image_members)


def _located(folder: Path, file_name: str, split: str) -> Path:
    from rmpl_ds.sources.base import find_image

    found = find_image(folder, file_name, split)
    assert found is not None, "the image checker found it"
    return found


def _image_member(path: Path, record: Any) -> tuple[str, bytes]:
    """(extension, normalized bytes) of a pair's image, as ``shards build`` stores image records' images."""
    from rmpl_ds.images import encode_image, load_image

    image = load_image(path)
    if image.size != (record.width, record.height):
        raise UserError(
            f"{path}: now {image.size[0]}x{image.size[1]}, was {record.width}x{record.height} when converted"
        )
    if path.suffix.lower() == ".png":
        return "png", encode_image(image, "png")
    return "jpg", encode_image(image, "jpeg")
