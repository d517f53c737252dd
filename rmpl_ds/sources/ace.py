"""ACE 2005 text events, in the three preprocessed formats people actually have (shared/notes/FORMATS.md §4).

* ``nlpcl-lab`` (nlpcl-lab/ace2005-preprocessing ``output/*.json``): a JSON list of sentences with ``sentence``,
  ``words``, ``golden-entity-mentions`` and ``golden-event-mentions`` (trigger and argument ``start``/``end`` are
  end-exclusive token offsets).
* ``jmee`` (EMNLP2018-JMEE, the format of M2E2's own ACE files): the same event structure, no ``sentence`` key,
  entity ids like ``"EM 0-2-14"``.
* ``oneie`` (OneIE ``*.oneie.json``): JSON Lines with ``tokens``, ``entity_mentions`` and ``event_mentions`` whose
  arguments carry only an ``entity_id`` (resolved through the entity mentions; TextEE-style inline
  ``start``/``end`` are used when present).

The format is detected per file from its content: a JSON array is nlpcl-lab when its sentences have a
``sentence`` key and JMEE otherwise; anything else is read as JSON Lines (OneIE). A JSON array is one document: if
it is not UTF-8 or does not parse, that is an error naming the file and line (none of its sentences could be
read). In JSON Lines each line is one record: a line that is not UTF-8 or not a JSON object is skipped with its
line number. The 8 ACE types that M2E2 uses are kept
(:data:`rmpl_ds.ontology.ACE_TO_M2E2`); mentions of the other 25 are dropped (counted), so their sentence is a
negative. Arguments keep the roles M2E2's text schema has for the type (:data:`rmpl_ds.ontology.TEXT_ROLES`);
time, crime, money and the like are dropped (counted). A type outside the 33 is bad input.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rmpl_ds.ontology import ACE_EVENT_TYPES, ACE_TO_M2E2, TEXT_ROLES
from rmpl_ds.records import TextArgument, TextEvent, TextSentence, Trigger
from rmpl_ds.sources.base import (
    DUPLICATE_ID,
    MALFORMED,
    UNKNOWN_ENTITY,
    UNKNOWN_EVENT_TYPE,
    Conversion,
    Problems,
    RecordError,
    count_records,
    decode_text,
    get,
    get_list,
    input_files,
    join_path,
    parse_json,
    read_bytes,
    sorted_counter,
    split_from_name,
    split_lines,
    token_span,
)

SOURCE = "ace"
NLPCL_LAB = "nlpcl-lab"
JMEE = "jmee"
ONEIE = "oneie"


class _Mapper:
    """ACE event mentions -> M2E2 text events, counting what the mapping leaves out."""

    def __init__(self) -> None:
        self.dropped_event_types: Counter[str] = Counter()
        self.dropped_roles: Counter[str] = Counter()

    def event(
        self, mention: Mapping[str, Any], tokens: list[str], path: str, arguments: list[tuple[str, int, int, str]]
    ) -> TextEvent | None:
        """The M2E2 event of one checked mention (``arguments`` already resolved), or None for a non-M2E2 type."""
        event_type = get(mention, "event_type", str, path)
        if event_type not in ACE_EVENT_TYPES:
            raise RecordError(
                UNKNOWN_EVENT_TYPE,
                f"{event_type!r} is not one of the 33 ACE 2005 event types",
                join_path(path, "event_type"),
            )
        m2e2_type = ACE_TO_M2E2[event_type]
        if m2e2_type is None:
            self.dropped_event_types[event_type] += 1
            return None
        trigger = get(mention, "trigger", dict, path)
        start, end = token_span(trigger, len(tokens), join_path(path, "trigger"))
        trigger_text = trigger.get("text") if isinstance(trigger.get("text"), str) else " ".join(tokens[start:end])
        kept: list[TextArgument] = []
        for role, arg_start, arg_end, text in arguments:
            if role in TEXT_ROLES[m2e2_type]:
                kept.append(TextArgument(role, arg_start, arg_end, text))
            else:
                self.dropped_roles[role] += 1
        return TextEvent(m2e2_type, Trigger(start, end, trigger_text), tuple(kept))


def convert(
    input_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    strict: bool = False,
    keep_negatives: bool = True,
) -> Conversion:
    """Convert ACE 2005 sentences (see the module docstring) to :class:`~rmpl_ds.records.TextSentence` records.

    ``input_path`` is one file or a directory of ``*.json`` / ``*.jsonl`` files; the split comes from each file
    name (``train.json`` -> ``train``; no split word -> ``all``). ``images_dir`` is ignored: ACE has no images.
    Sentence ids are ``<file stem>-<index>`` for the list formats and OneIE's ``sent_id``.
    """
    del images_dir  # ACE is text only; the parameter exists so every converter has the same signature.
    problems = Problems(strict)
    mapper = _Mapper()
    records: list[TextSentence] = []
    formats: dict[str, str] = {}
    seen_ids: set[str] = set()
    negatives_dropped = 0
    for path in input_files(input_path, (".json", ".jsonl")):
        split = split_from_name(path)
        data = read_bytes(path)
        if data.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
            items = parse_json(path, decode_text(path, data))
            file_format, sentences = _read_list_file(path, items, split, problems, mapper)
        else:
            file_format, sentences = _read_oneie_file(path, split_lines(path, data, problems), split, problems, mapper)
        formats[path.name] = file_format
        for location, sentence in sentences:
            if sentence.id in seen_ids:
                problems.report(path, location, DUPLICATE_ID, f"sentence id {sentence.id!r} occurs twice")
                continue
            seen_ids.add(sentence.id)
            if not sentence.events and not keep_negatives:
                negatives_dropped += 1
                continue
            records.append(sentence)
    counts = count_records(records)
    counts.update(
        formats=formats,
        dropped_event_types=sorted_counter(mapper.dropped_event_types),
        dropped_roles=sorted_counter(mapper.dropped_roles),
        negatives_dropped=negatives_dropped,
    )
    detected = "+".join(sorted(set(formats.values()))) or "none"
    return Conversion(SOURCE, detected, list(records), problems.skipped, counts)


def _read_list_file(
    path: Path, items: list[Any], split: str, problems: Problems, mapper: _Mapper
) -> tuple[str, list[tuple[str, TextSentence]]]:
    """An nlpcl-lab or JMEE file, parsed: (format, [(key path, sentence)]); bad sentences are reported."""
    # nlpcl-lab keeps the raw sentence; JMEE never has it. Decide once per file, from the content.
    file_format = NLPCL_LAB if any(isinstance(item, dict) and "sentence" in item for item in items) else JMEE
    sentences: list[tuple[str, TextSentence]] = []
    for index, item in enumerate(items):
        location = f"[{index}]"
        try:
            tokens = get_list(item, "words", str)
            events = []
            for number, mention in enumerate(get_list(item, "golden-event-mentions", dict)):
                mention_path = f"golden-event-mentions[{number}]"
                arguments = _inline_arguments(mention, tokens, mention_path)
                event = mapper.event(mention, tokens, mention_path, arguments)
                if event is not None:
                    events.append(event)
        except RecordError as problem:
            problems.report_problem(path, location, problem, key_paths=True)
            continue
        sentence_id = f"{path.stem}-{index}"
        sentences.append((location, TextSentence(sentence_id, SOURCE, split, tuple(tokens), tuple(events))))
    return file_format, sentences


def _inline_arguments(mention: Mapping[str, Any], tokens: list[str], path: str) -> list[tuple[str, int, int, str]]:
    """Arguments written with their own ``start``/``end``: (role, start, end, text)."""
    resolved = []
    for number, argument in enumerate(get_list(mention, "arguments", dict, path)):
        argument_path = join_path(path, f"arguments[{number}]")
        role = get(argument, "role", str, argument_path)
        start, end = token_span(argument, len(tokens), argument_path)
        text = argument.get("text") if isinstance(argument.get("text"), str) else " ".join(tokens[start:end])
        resolved.append((role, start, end, text))
    return resolved


def _read_oneie_file(
    path: Path, lines: Iterable[tuple[int, str]], split: str, problems: Problems, mapper: _Mapper
) -> tuple[str, list[tuple[str, TextSentence]]]:
    """A OneIE JSON Lines file: ("oneie", [(line number, sentence)]); bad lines are reported and left out."""
    sentences: list[tuple[str, TextSentence]] = []
    for line_number, line in lines:
        if not line.strip():
            continue
        location = str(line_number)
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.report(path, location, MALFORMED, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        try:
            sentence = _oneie_sentence(item, path, line_number, split, mapper)
        except RecordError as problem:
            problems.report_problem(path, location, problem, key_paths=False)
            continue
        sentences.append((location, sentence))
    return ONEIE, sentences


def _oneie_sentence(item: Any, path: Path, line_number: int, split: str, mapper: _Mapper) -> TextSentence:
    tokens = get_list(item, "tokens", str)
    spans: dict[str, tuple[int, int, str]] = {}
    for number, entity in enumerate(get_list(item, "entity_mentions", dict)):
        entity_path = f"entity_mentions[{number}]"
        start, end = token_span(entity, len(tokens), entity_path)
        text = entity.get("text") if isinstance(entity.get("text"), str) else " ".join(tokens[start:end])
        spans[get(entity, "id", str, entity_path)] = (start, end, text)
    events = []
    for number, mention in enumerate(get_list(item, "event_mentions", dict)):
        mention_path = f"event_mentions[{number}]"
        arguments = []
        for arg_number, argument in enumerate(get_list(mention, "arguments", dict, mention_path)):
            argument_path = join_path(mention_path, f"arguments[{arg_number}]")
            role = get(argument, "role", str, argument_path)
            if "start" in argument or "end" in argument:  # TextEE writes the span inline.
                start, end = token_span(argument, len(tokens), argument_path)
                text = argument.get("text") if isinstance(argument.get("text"), str) else " ".join(tokens[start:end])
            else:
                entity_id = get(argument, "entity_id", str, argument_path)
                if entity_id not in spans:
                    raise RecordError(
                        UNKNOWN_ENTITY, f"entity_id {entity_id!r} is not among the entity mentions", argument_path
                    )
                start, end, text = spans[entity_id]
                text = argument.get("text") if isinstance(argument.get("text"), str) else text
            arguments.append((role, start, end, text))
        event = mapper.event(mention, tokens, mention_path, arguments)
        if event is not None:
            events.append(event)
    sentence_id = item.get("sent_id") if isinstance(item.get("sent_id"), str) else f"{path.stem}-{line_number}"
    document_id = item.get("doc_id") if isinstance(item.get("doc_id"), str) else ""
    return TextSentence(sentence_id, SOURCE, split, tuple(tokens), tuple(events), document_id)
