"""Event schema files -> :class:`~rmpl_ds.records.SchemaQuestion` records (LLaVA-MS-PIT's textual-schema stage).

A schema file is one JSON object::

    {"event_types": {
        "Justice:Arrest-Jail": {
            "definition": "a person is taken into custody or held in detention by an authority",
            "text_roles": ["Agent", "Person", "Place"],
            "image_roles": ["Agent", "Instrument", "Person"]},
        ...}}

Each event type yields one question per form of :data:`rmpl_ds.tasks.SCHEMA_FORMS` (its text roles, its image
roles, the type its definition describes), rendered by the ``ts`` task from the record's own fields, so a schema file
can word the definitions its own way and list a subset of the roles. :func:`write_schema_file` writes the package's
ontology in this format.

An event type is one record: its entry is skipped (reported with the file and the key path, e.g.
``event_types["Life:Die"].text_roles[1]``) when the type is not one of :data:`rmpl_ds.ontology.EVENT_TYPES`, a field
is missing or of the wrong type, the definition is blank, or a role is not one the ontology gives the type in that
modality (:data:`~rmpl_ds.ontology.TEXT_ROLES`, :data:`~rmpl_ds.ontology.IMAGE_ROLES`) or is listed twice. Keys the
format does not name are ignored. A file that is not UTF-8, does not parse or has no ``event_types`` object holds no
readable entry: that is an error naming the file, strict or not. Record ids are ``schema:<type>:<form>``, the
split is ``train``; a type that an earlier file already gave is skipped as a duplicate id.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmpl_ds import atomic
from rmpl_ds.errors import UserError
from rmpl_ds.ontology import DEFINITIONS, EVENT_TYPES, IMAGE_ROLES, TEXT_ROLES
from rmpl_ds.records import SchemaQuestion
from rmpl_ds.sources.base import (
    DUPLICATE_ID,
    MALFORMED,
    UNKNOWN_EVENT_TYPE,
    UNKNOWN_ROLE,
    Conversion,
    Problems,
    RecordError,
    count_records,
    get,
    get_list,
    input_files,
    join_path,
    json_kind,
    load_json,
    sorted_counter,
)
from rmpl_ds.tasks import SCHEMA_FORMS

SOURCE = "schema"
FORMAT = "schema-json"
SPLIT = "train"
DUPLICATE_ROLE = "duplicate role"

# The role lists of an entry and the ontology table each is checked against.
_ROLE_FIELDS: tuple[tuple[str, dict[str, tuple[str, ...]]], ...] = (
    ("text_roles", TEXT_ROLES),
    ("image_roles", IMAGE_ROLES),
)


def convert(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """Schema ``*.json`` files -> one :class:`~rmpl_ds.records.SchemaQuestion` per event type and form.

    ``input_path``: one file or a directory of ``*.json`` files (read in name order). ``images_dir`` and
    ``keep_negatives`` are part of the converter contract and have nothing to act on here: schema questions refer to
    no image and none is a negative. Bad entries are skipped (or raise :class:`~rmpl_ds.sources.SourceError` under
    ``strict``); a file that is not UTF-8, does not parse or is not ``{"event_types": {...}}`` raises UserError.
    """
    problems = Problems(strict)
    records: list[SchemaQuestion] = []
    seen: dict[str, Path] = {}
    by_form: Counter[str] = Counter()
    for path in input_files(input_path, (".json",)):
        document = load_json(path)
        entries = document.get("event_types") if isinstance(document, dict) else None
        if not isinstance(entries, dict):
            if not isinstance(document, dict):
                found = json_kind(document)
            elif "event_types" not in document:
                found = 'an object without "event_types"'
            else:
                found = f'"event_types" as {json_kind(entries)}'
            raise UserError(f'{path}: expected a JSON object {{"event_types": {{...}}}}, found {found}')
        for event_type, entry in entries.items():
            location = f"event_types[{json.dumps(event_type, ensure_ascii=False)}]"
            try:
                questions = _questions(event_type, entry)
            except RecordError as problem:
                problems.report_problem(path, location, problem, key_paths=True)
                continue
            if event_type in seen:
                problems.report(path, location, DUPLICATE_ID, f"{event_type} is already defined in {seen[event_type]}")
                continue
            seen[event_type] = path
            records.extend(questions)
            by_form.update(question.form for question in questions)
    counts = count_records(records)
    counts.update(event_types=len(seen), by_form=sorted_counter(by_form))
    return Conversion(SOURCE, FORMAT if seen else "none", list(records), problems.skipped, counts)


def _questions(event_type: str, entry: Any) -> list[SchemaQuestion]:
    """The questions of one checked entry, one per form."""
    if event_type not in EVENT_TYPES:
        raise RecordError(UNKNOWN_EVENT_TYPE, f"{event_type!r} is not one of the {len(EVENT_TYPES)} M2E2 event types")
    definition = get(entry, "definition", str)
    if not definition.strip():
        raise RecordError(MALFORMED, "the definition is blank", "definition")
    roles = {name: _roles(entry, name, ontology[event_type]) for name, ontology in _ROLE_FIELDS}
    return [
        SchemaQuestion(
            id=f"{SOURCE}:{event_type}:{form}",
            source=SOURCE,
            split=SPLIT,
            event_type=event_type,
            form=form,
            definition=definition,
            text_roles=roles["text_roles"],
            image_roles=roles["image_roles"],
        )
        for form in SCHEMA_FORMS
    ]


def _roles(entry: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    roles = get_list(entry, key, str)
    for index, role in enumerate(roles):
        path = join_path(key, f"[{index}]")
        if role not in allowed:
            raise RecordError(UNKNOWN_ROLE, f"{role!r} is not one of {list(allowed)}", path)
        if role in roles[:index]:
            raise RecordError(DUPLICATE_ROLE, f"{role!r} is listed twice", path)
    return tuple(roles)


def write_schema_file(path: str | Path) -> Path:
    """Write the package's own ontology (:data:`~rmpl_ds.ontology.DEFINITIONS`, ``TEXT_ROLES``, ``IMAGE_ROLES``, in
    :data:`~rmpl_ds.ontology.EVENT_TYPES` order) as a schema file at ``path`` (atomically); returns the path."""
    document = {
        "event_types": {
            event_type: {
                "definition": DEFINITIONS[event_type],
                "text_roles": list(TEXT_ROLES[event_type]),
                "image_roles": list(IMAGE_ROLES[event_type]),
            }
            for event_type in EVENT_TYPES
        }
    }
    return atomic.write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
