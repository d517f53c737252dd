"""MNRE multimodal relation pairs (shared/notes/FORMATS.md §2).

Each line of ``mnre_{train,test}.txt`` and ``mnre_val .txt`` (the real name has a space) is a Python dict literal,
not JSON: strings with an apostrophe switch to double quotes. Lines are parsed with :func:`ast.literal_eval`,
which builds literals only and never runs code. A line holds ``token``, ``h`` / ``t`` = ``{name, pos: [s, e)}``
(token offsets, end-exclusive, ``name == " ".join(token[s:e])``), ``img_id`` and ``relation``.

* ``mnre-v2`` (the current release): key order ``token, h, t, img_id, relation``; 23 labels, ``None`` for no
  relation (:data:`rmpl_ds.ontology.RELATION_LABELS`).
* ``mnre-v1`` (``Version-1/mnre_txt_org.zip``): key order ``token, h, t, relation, img_id``; its own label set with
  a lowercase ``none`` (:data:`rmpl_ds.ontology.MNRE_V1_RELATION_LABELS`), which becomes ``None`` here.

The version is detected per file from the key order of its first readable line. Each line is one record: a line
that is not UTF-8, not a literal or not a dict is skipped with its line number, like any other bad record.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmpl_ds.ontology import MNRE_V1_NO_RELATION, MNRE_V1_RELATION_LABELS, NO_RELATION, RELATION_LABELS
from rmpl_ds.records import EntityMention, RelationPair
from rmpl_ds.sources.base import (
    MALFORMED,
    UNKNOWN_RELATION,
    WRONG_TYPE,
    Conversion,
    ImageChecker,
    Problems,
    RecordError,
    check_span,
    count_records,
    describe,
    get,
    get_list,
    input_files,
    read_lines,
    split_from_name,
)

SOURCE = "mnre"
MNRE_V2 = "mnre-v2"
MNRE_V1 = "mnre-v1"
ENTITY_NAME_MISMATCH = "entity name differs from its tokens"

# A real line is under 2 KB; anything far larger is not an MNRE line, and literal_eval's cost grows with it.
MAX_LINE_CHARS = 100_000
# What a dict literal is made of (BinOp: literal_eval's complex numbers, ``1+2j``). Anything else in a line that
# literal_eval refuses (a call, a name, ...) is named in the skip reason.
_LITERAL_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Dict,
    ast.List,
    ast.Tuple,
    ast.Set,
    ast.UnaryOp,
    ast.BinOp,
    ast.unaryop,
    ast.operator,
    ast.expr_context,
)


def convert(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """MNRE ``*.txt`` files -> :class:`~rmpl_ds.records.RelationPair` records, one per line.

    ``input_path``: one file or a directory of ``*.txt`` files; the split comes from the file name
    (``mnre_val .txt`` -> ``val``). Record ids are ``<file stem without spaces>-<line>``. Images are looked up as
    ``images_dir/<img_id>``, else ``images_dir/<split>/<img_id>`` (the ``img_org/{train,val,test}`` layout).
    ``keep_negatives=False`` leaves out ``None`` pairs.
    """
    problems = Problems(strict)
    images = ImageChecker(images_dir) if images_dir is not None else None
    records: list[RelationPair] = []
    formats: dict[str, str] = {}
    negatives_dropped = 0
    for path in input_files(input_path, (".txt",)):
        split = split_from_name(path)
        stem = path.stem.replace(" ", "")
        file_format = ""
        for line_number, line in read_lines(path, problems):
            if not line.strip():
                continue
            item = _parse_line(line, path, line_number, problems)
            if item is None:
                continue
            if not file_format:
                file_format = _detect_version(item)
                formats[path.name] = file_format
            try:
                record = _pair(item, f"{stem}-{line_number}", split, file_format, images)
            except RecordError as problem:
                problems.report_problem(path, str(line_number), problem, key_paths=False)
                continue
            if record.relation == NO_RELATION and not keep_negatives:
                negatives_dropped += 1
                continue
            records.append(record)
    counts = count_records(records)
    counts.update(formats=formats, negatives_dropped=negatives_dropped)
    detected = "+".join(sorted(set(formats.values()))) or "none"
    return Conversion(SOURCE, detected, list(records), problems.skipped, counts)


def _parse_line(line: str, path: Path, line_number: int, problems: Problems) -> dict[str, Any] | None:
    """The line's dict, or None after reporting why it is not one."""
    if len(line) > MAX_LINE_CHARS:
        problems.report(path, str(line_number), MALFORMED, f"line of {len(line)} characters is not an MNRE record")
        return None
    # Parsed first and evaluated as a tree, so that the reason can name what is wrong in fixed words: literal_eval's
    # own message holds the repr of an AST node with its memory address, which differs from run to run.
    try:
        tree = ast.parse(line.strip(), mode="eval")
    except SyntaxError as exc:
        where = f" (column {exc.offset})" if exc.offset else ""
        problems.report(path, str(line_number), MALFORMED, f"not a Python literal: {exc.msg}{where}")
        return None
    except (ValueError, MemoryError, RecursionError) as exc:  # null bytes; nesting too deep for the parser
        problems.report(path, str(line_number), MALFORMED, f"not a Python literal: {type(exc).__name__}")
        return None
    try:
        item = ast.literal_eval(tree)
    except (ValueError, TypeError, MemoryError, RecursionError):
        problems.report(path, str(line_number), MALFORMED, f"not a Python literal: {_not_literal(tree)}")
        return None
    if not isinstance(item, dict):
        problems.report(path, str(line_number), MALFORMED, f"expected a dict literal, found {describe(item)}")
        return None
    return item


def _not_literal(tree: ast.AST) -> str:
    """The first part of ``tree`` that is not a literal, e.g. ``a Call at column 0``."""
    for node in ast.walk(tree):
        if not isinstance(node, _LITERAL_NODES):
            return f"a {type(node).__name__} at column {getattr(node, 'col_offset', 0)}"
    return "only strings, numbers, tuples, lists, dicts, sets, booleans and None are allowed"


def _detect_version(item: Mapping[str, Any]) -> str:
    """v1 writes ``relation`` before ``img_id``; v2 the other way round (literal_eval keeps the written order)."""
    keys = list(item)
    if "relation" in keys and "img_id" in keys and keys.index("relation") < keys.index("img_id"):
        return MNRE_V1
    return MNRE_V2


def _entity(item: Mapping[str, Any], key: str, tokens: list[str]) -> EntityMention:
    entity = get(item, key, dict)
    name = get(entity, "name", str, key)
    pos = get_list(entity, "pos", int, key)
    if len(pos) != 2:
        raise RecordError(WRONG_TYPE, f"expected [start, end], found {describe(pos)}", f"{key}.pos")
    start, end = check_span(pos[0], pos[1], len(tokens), f"{key}.pos")
    if " ".join(tokens[start:end]) != name:
        raise RecordError(
            ENTITY_NAME_MISMATCH, f"name {name!r} but tokens [{start}, {end}) are {' '.join(tokens[start:end])!r}", key
        )
    return EntityMention(name, start, end)


def _pair(
    item: Mapping[str, Any], record_id: str, split: str, file_format: str, images: ImageChecker | None
) -> RelationPair:
    tokens = get_list(item, "token", str)
    head = _entity(item, "h", tokens)
    tail = _entity(item, "t", tokens)
    image = get(item, "img_id", str)
    relation = get(item, "relation", str)
    if file_format == MNRE_V1:
        if relation not in MNRE_V1_RELATION_LABELS:
            raise RecordError(UNKNOWN_RELATION, f"{relation!r} is not an MNRE v1 label", "relation")
        relation = NO_RELATION if relation == MNRE_V1_NO_RELATION else relation
    elif relation not in RELATION_LABELS:
        raise RecordError(UNKNOWN_RELATION, f"{relation!r} is not one of the 23 MNRE labels", "relation")
    if images is not None:
        images.size(image, split)
    return RelationPair(record_id, SOURCE, split, tuple(tokens), head, tail, relation, image)
