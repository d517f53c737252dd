"""Tasks: render a record for a task into an :class:`~rmpl_ds.example.Example`, and parse generated text back.

Eight tasks, looked up by name in :data:`TASKS`:

=========  ======  ===============================  ================================================================
task       stage   records                          the model answers
=========  ======  ===============================  ================================================================
``t``      I       TextSentence (ACE, M2E2)         every event of the sentence: type, trigger and text arguments
``i``      I       ImageRecord (SWiG/imSitu, M2E2)  every event of the image: type and argument boxes
``r``      I       RelationPair (MNRE)              the relation label between the named head and tail entities
``EM``     II      TextSentence or ImageRecord      the event types mentioned in the sentence / shown in the image
``AR``     II      TextSentence or ImageRecord      for one given event type: its mentions' triggers and arguments
                                                    (text) or its argument boxes (image)
``joint``  II      TextSentence or ImageRecord      EM and t (sentence) / i (image) in one answer, under fixed
                                                    headers (M-MRE's joint coarse and fine tasks)
``vs``     schema  ImageRecord                      the event types shown and, per type, which of its image roles
                                                    are visible (LLaVA-MS-PIT's visual schema questions)
``ts``     schema  SchemaQuestion                   one question about the ontology: a type's text or image roles,
                                                    or the type a definition describes (textual schema questions)
=========  ======  ===============================  ================================================================

Prompts carry the schema: the system turn lists the event types with their roles (:data:`TEXT_ROLES` for text,
:data:`IMAGE_ROLES` for images), AR names the given type and its roles, ``r`` lists the 23 MNRE labels. With
``schema_guided=True`` (LLaVA-MS-PIT's schema-guided instructions) the EM, AR and joint system turns list every event
type with its roles for the modality and its definition (:data:`DEFINITIONS`); targets do not change. The other
tasks ignore the option: t, i and vs already list the types with their roles, r has no event types, and ts asks
about the schema itself, so listing it would give the answer away. A ts prompt shows the record's own definition
(a schema file can word it differently from :data:`DEFINITIONS`).

Target formats (one event per line; ``none`` alone when there is nothing to report)::

    t      Conflict:Attack | fired | Attacker: soldiers ; Target: village    (type | trigger | arguments)
           Life:Die | killed                                                 (an event with no arguments)
    i      Justice:Arrest-Jail | Agent: [121,100,412,998] ; Person: [386,112,799,998]
    EM     Conflict:Attack ; Life:Die
    AR     fired | Attacker: soldiers ; Target: village                      (text: one line per mention)
    AR     Agent: [121,100,412,998] ; Person: [386,112,799,998]              (image: one line, all boxes of the type)
    r      /per/per/couple
    joint  Task 1 Answer: Conflict:Attack ; Life:Die                         (the EM answer, on the header's line)
           Task 2 Answer:
           Conflict:Attack | fired | Attacker: soldiers ; Target: village    (the t answer; i for an image)
           Life:Die | killed
    vs     Justice:Arrest-Jail | Agent ; Person                              (type | roles with a box)
           Life:Die                                                          (a type with no visible role)
    ts     Agent ; Person ; Place                                            (forms roles, image_roles)
    ts     Justice:Arrest-Jail                                               (form type_of_definition)

A joint answer with no event is ``Task 1 Answer: none``, ``Task 2 Answer:``, ``none``. vs lists each event type of
the image once (:data:`EVENT_TYPES` order) with the roles of :data:`IMAGE_ROLES` that some argument of that type
fills with a box, in schema order. ts answers with the record's roles in the record's order (the forms are
:data:`SCHEMA_FORMS`).

Text AR lines start with the trigger because EM gives types only, and M2E2 scores text arguments (and triggers)
by trigger offsets: the trigger is how two mentions of one type in a sentence are told apart.

Order is deterministic: text events by (trigger span, type order), image events by type order then arguments;
arguments by the role's position in the type's schema, then span (text) or box (image). EM lists types in
:data:`EVENT_TYPES` order.

Text strings. A trigger or argument is written as its tokens joined by single spaces (whitespace inside a token
collapsed). Inside such a value, ``\\``, ``|``, ``;`` and ``#`` are escaped with a backslash, and a value that reads
``none`` is written ``\\none``; everything else (``:`` included, because roles are split at the first colon) is
literal. The parser maps a string back to a token span among the occurrences that start and end on token
boundaries (ignoring whitespace if there is no exact occurrence):

* a trigger takes the first occurrence at or after the previous line's trigger start that no earlier line of the
  same event type took (failing that, the first one not taken, then the first), because lines are in trigger order
  and one word can trigger events of two types;
* an argument takes the occurrence nearest its event's trigger (token gap between the spans), ties going to the one
  after the trigger;
* when this rule would pick the wrong occurrence, the renderer appends ``#k`` (the k-th occurrence in the sentence,
  from 1), e.g. ``attack#2``, which overrides the rule; so spans survive the round trip exactly.

Spans are recovered from the sentence's tokens, so the ``text`` of a gold trigger or argument is the joined tokens
(M2E2's argument ``text`` is the article's surface string and sometimes differs, e.g. ``Obama’s`` vs ``Obama ’s``).
Image lines have no trigger field; an image event whose arguments are all ungrounded is its type alone.

Boxes. A box is written ``[x1,y1,x2,y2]`` with integers in [0, 1000): ``x * 1000 // W`` and ``y * 1000 // H`` of the
record's pixel box (clipped to the image), the Qwen2-VL grounding convention. It does not depend on any resize the
backbone does. The parser maps a coordinate q back to the middle of the integer pixels x with ``x * 1000 // W == q``,
using the width and height in ``example.meta``, so a recovered box is off by at most ``ceil(W / 1000)`` pixels
(``ceil(H / 1000)`` vertically), and re-quantizing it gives q again. That is the plain syntax; ``boxes=`` gives
another (rmpl_ds.grounding: each backbone's own, on its own grid), with the same exact round trip.

:func:`to_structure` gives a record's gold in exactly the shape :func:`parse` returns, after the same lossy steps
(quantized boxes, joined token strings), so ``parse(t, render(r, t).target, example_meta=...) == to_structure(r, t)``
for every record. What the format cannot express is left out of both: event types outside :data:`EVENT_TYPES`, roles
outside the type's schema for that modality, ungrounded visual arguments (``box is None``), duplicate arguments, and
spans whose tokens are all blank.

:func:`parse` never raises on the text: a malformed fragment (unknown type or role, broken box, string not in the
sentence, missing separator, stray line, empty output) is skipped or kept partially and counted in
:attr:`Parsed.errors`. Type, role and label names are also accepted in another letter case, strings with other
spacing; neither counts as an error. Parsed events keep the order of the text. vs and ts read roles separated by
``;`` or ``,``.

A joint answer is split at its headers, found at the start of a line in any letter case and spacing: Task 1's answer
is the text after ``Task 1 Answer:`` up to the other header, Task 2's the text after ``Task 2 Answer:`` up to the
other header or the end, and each is read as EM, t or i reads it. A missing header is one error and its answer is
looked for where it would be: without ``Task 1 Answer:`` it is the text before ``Task 2 Answer:``; without
``Task 2 Answer:`` it is the lines after Task 1's line; without either, the first line and the rest. Text before
the first header is stray (one error).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from rmpl_ds.example import Example
from rmpl_ds.grounding import PLAIN, BoxSyntax, dequantize_box, quantize_box
from rmpl_ds.ontology import DEFINITIONS, EVENT_TYPES, IMAGE_ROLES, RELATION_LABELS, TEXT_ROLES
from rmpl_ds.records import Box, ImageRecord, Record, RelationPair, SchemaQuestion, TextSentence

Span = tuple[int, int]

NONE = "none"
# Characters that separate fields, arguments and occurrence markers; escaped with a backslash inside strings.
_ESCAPED = frozenset("\\|;#")
# The digits of an occurrence marker or a box coordinate (str.isdigit would also accept "²", which int() refuses).
_NUMBER = re.compile(r"[0-9]+")
# Tolerated aspect-ratio mismatch between the decoded image and the record's size (resized copies round).
_ASPECT_TOLERANCE = 0.02

# The questions a SchemaQuestion asks (its ``form``): the type's roles in text, its roles in images, or which type a
# definition describes.
SCHEMA_FORMS: tuple[str, ...] = ("roles", "image_roles", "type_of_definition")
# The roles a role form asks for: the record's field, and the ontology table the parser matches answers against.
_FORM_ROLES: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "roles": ("text_roles", TEXT_ROLES),
    "image_roles": ("image_roles", IMAGE_ROLES),
}
# The joint task's fixed answer headers, and how the parser finds them (line start, any case and spacing).
JOINT_HEADERS: tuple[str, str] = ("Task 1 Answer:", "Task 2 Answer:")
_JOINT_HEADER = re.compile(r"^[ \t]*task[ \t]*([12])[ \t]*answer[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Task:
    """A task of the registry: its name, its training stage and the record types it renders."""

    name: str
    stage: str
    summary: str
    record_types: tuple[type, ...]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("t", "I", "text event extraction: types, triggers and arguments of every event", (TextSentence,)),
        Task("i", "I", "visual event extraction: types and argument boxes of every event", (ImageRecord,)),
        Task("r", "I", "multimedia relation extraction: the relation between two entities", (RelationPair,)),
        Task("EM", "II", "event mention identification: the event types present", (TextSentence, ImageRecord)),
        Task("AR", "II", "argument role extraction given the event type", (TextSentence, ImageRecord)),
        Task(
            "joint",
            "II",
            "event mentions and their arguments in one answer, under fixed headers",
            (TextSentence, ImageRecord),
        ),
        Task("vs", "schema", "visual schema: the event types shown and their visible roles", (ImageRecord,)),
        Task("ts", "schema", "textual schema: a question about an event type's definition or roles", (SchemaQuestion,)),
    )
}


_MODALITIES: dict[type, str] = {
    TextSentence: "text",
    ImageRecord: "image",
    RelationPair: "relation",
    SchemaQuestion: "schema",
}


@dataclass(frozen=True)
class ParsedArgument:
    """An argument: text ones have ``text`` (as written) and ``span`` (tokens, end-exclusive; None if not found);
    visual ones have ``box`` in pixels of the record's image; a ``vs`` role (visible, not located) has neither."""

    role: str
    text: str | None = None
    span: Span | None = None
    box: Box | None = None


@dataclass(frozen=True)
class ParsedEvent:
    """An event: image events have no trigger; ``trigger_span`` is None when the trigger was not found."""

    event_type: str
    trigger: str | None = None
    trigger_span: Span | None = None
    arguments: tuple[ParsedArgument, ...] = ()


@dataclass(frozen=True)
class Parsed:
    """What a task's output says, as structures.

    ``events`` for ``t``, ``i`` and ``AR``; ``event_types`` for ``EM``; both for ``joint`` (Task 1's types, Task 2's
    events); ``relation`` for ``r`` (the label string, ``"None"`` included; Python ``None`` when no label could be
    read). ``vs``: ``events``, one per answered type, whose arguments are the visible roles (``ParsedArgument(role)``,
    no text, span or box). ``ts``: ``roles`` for the forms ``roles`` and ``image_roles`` (in the answer's order),
    ``event_types`` (the one type read) for ``type_of_definition``. ``errors`` counts malformed fragments.
    """

    task: str
    events: tuple[ParsedEvent, ...] = ()
    event_types: tuple[str, ...] = ()
    relation: str | None = None
    roles: tuple[str, ...] = ()
    errors: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Public API


def render(
    record: Record,
    task: str,
    *,
    image: Image.Image | None = None,
    event_type: str | None = None,
    boxes: BoxSyntax = PLAIN,
    schema_guided: bool = False,
) -> Example:
    """Render ``record`` for ``task`` as one Example (prompt carrying the schema, linearized gold target).

    ``image`` is the decoded image stored beside the record: required for image records and relation pairs, refused
    for sentences and schema questions. ``event_type`` is required for ``AR`` (the type whose arguments are asked
    for; a type the record does not have gives the target ``none``) and refused otherwise. ``boxes`` is how image
    arguments are written (rmpl_ds.grounding: the plain syntax, or the backbone's own). ``schema_guided``: the EM, AR
    and joint system turns list every event type with its roles and definition; it changes no target, and the other
    tasks ignore it (see the module docstring).

    Raises ValueError for an unknown task, a record the task does not apply to, a missing/extra image or event
    type, an image whose aspect ratio differs from the record's size, a record with an out-of-range span or an
    unknown relation label, or a schema question outside the ontology.
    """
    spec = _task(task)
    _check_applies(spec, record)
    _check_event_type(spec, event_type)
    _check_image(spec, record, image)
    structure = to_structure(record, task, event_type=event_type, boxes=boxes)
    meta = _meta(record, task, event_type)
    system, prompt = _prompt(task, record, event_type, boxes, schema_guided)
    images = () if image is None else (image if image.mode == "RGB" else image.convert("RGB"),)
    return Example(
        task=task,
        system=system,
        prompt=prompt,
        target=_linearize(structure, meta, boxes),
        images=images,
        source=getattr(record, "source", ""),
        key=getattr(record, "id", ""),
        meta=meta,
    )


def render_all(
    record: Record,
    task: str,
    *,
    image: Image.Image | None = None,
    boxes: BoxSyntax = PLAIN,
    schema_guided: bool = False,
) -> list[Example]:
    """Every Example of ``record`` for ``task``: one per gold event type (in EVENT_TYPES order) for ``AR``, none for a
    record without events; exactly one for the other tasks. Raises as :func:`render` does."""
    if _task(task).name != "AR":
        return [render(record, task, image=image, boxes=boxes, schema_guided=schema_guided)]
    _check_applies(TASKS["AR"], record)
    types_present = to_structure(record, "EM").event_types
    return [
        render(record, task, image=image, event_type=event_type, boxes=boxes, schema_guided=schema_guided)
        for event_type in types_present
    ]


def to_structure(record: Record, task: str, event_type: str | None = None, boxes: BoxSyntax = PLAIN) -> Parsed:
    """The gold of ``record`` for ``task`` in the shape :func:`parse` returns (``errors == 0``).

    Lossy exactly as the target format is (see the module docstring): boxes are quantized and mapped back, strings
    are whitespace-joined tokens, off-schema content is left out. Raises ValueError as :func:`render` does.
    """
    spec = _task(task)
    _check_applies(spec, record)
    _check_event_type(spec, event_type)
    if isinstance(record, RelationPair):
        if record.relation not in RELATION_LABELS:
            raise ValueError(
                f"{record.id}: relation {record.relation!r} is not one of the {len(RELATION_LABELS)} MNRE labels"
            )
        return Parsed(task=task, relation=record.relation)
    if isinstance(record, SchemaQuestion):
        return _schema_answer(record)
    if task == "vs":
        return Parsed(task=task, events=_visible_roles(record))  # type: ignore[arg-type]
    events = _gold_text_events(record) if isinstance(record, TextSentence) else _gold_image_events(record, boxes)  # type: ignore[arg-type]
    if task in ("EM", "joint"):
        event_types = _types_in_order(event.event_type for event in events)
        return Parsed(task=task, events=events if task == "joint" else (), event_types=event_types)
    if task == "AR":
        chosen = tuple(event for event in events if event.event_type == event_type)
        if isinstance(record, ImageRecord):
            arguments = _sorted_unique_boxes(event_type, [arg for event in chosen for arg in event.arguments])
            chosen = (ParsedEvent(event_type, arguments=arguments),) if arguments else ()
        return Parsed(task=task, events=chosen)
    return Parsed(task=task, events=events)


def parse(task: str, text: str, *, example_meta: dict[str, Any], boxes: BoxSyntax = PLAIN) -> Parsed:
    """Read the structure back from generated ``text`` for ``task``; never raises on any text.

    ``example_meta`` is the rendered Example's ``meta`` (it carries the sentence tokens, the image size, the AR
    event type, the ts question's type and form); ``boxes`` is the syntax the answer writes image arguments in.
    Malformed fragments are skipped or kept partially and counted in ``errors``. Raises ValueError only for an
    unknown task or a meta dict that :func:`render` did not produce.
    """
    spec = _task(task)
    modality = _meta_get(example_meta, "modality", str)
    allowed = {_MODALITIES[record_type] for record_type in spec.record_types}
    if modality not in allowed:
        raise ValueError(f"task {task!r} parses {sorted(allowed)} examples; example_meta is for a {modality!r} one")
    if spec.name == "joint":
        return _parse_joint(text, example_meta, modality, boxes)
    return _parse_answer(spec.name, text, example_meta, modality, boxes)


def _parse_answer(task: str, text: str, meta: dict[str, Any], modality: str, boxes: BoxSyntax) -> Parsed:
    """The answer of one task that is not ``joint`` (each of joint's two answers is read by this too)."""
    stripped = text.strip()
    if task == "r":
        return _parse_relation(stripped)
    if task == "ts":
        form = _meta_get(meta, "form", str)
        if form not in SCHEMA_FORMS:
            raise ValueError(f"example_meta['form'] must be one of {list(SCHEMA_FORMS)} as render() writes it")
    if not stripped:
        return Parsed(task=task, errors=1)
    if stripped.lower() == NONE:
        return Parsed(task=task)
    lines = [line for line in (raw.strip() for raw in stripped.splitlines()) if line]
    if task == "EM":
        return _parse_types(lines)
    if task == "vs":
        return _parse_visible_roles(lines)
    if task == "ts":
        return _parse_schema_answer(lines, meta)
    if modality == "text":
        sentence = _Sentence(_meta_get(meta, "tokens", list))
        fixed_type = _meta_get(meta, "event_type", str) if task == "AR" else None
        events, errors = _parse_text_events(lines, sentence, fixed_type)
        return Parsed(task=task, events=events, errors=errors)
    size = (_meta_get(meta, "width", int), _meta_get(meta, "height", int))
    if task == "AR":
        return _parse_image_arguments(lines, _meta_get(meta, "event_type", str), size, boxes)
    events, errors = _parse_image_events(lines, size, boxes)
    return Parsed(task=task, events=events, errors=errors)


# ---------------------------------------------------------------------------------------------------------------
# Checks and meta


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def _check_applies(spec: Task, record: Record) -> None:
    if not isinstance(record, spec.record_types):
        expected = " or ".join(cls.__name__ for cls in spec.record_types)
        raise ValueError(
            f"task {spec.name!r} ({spec.summary}) renders {expected} records, "
            f"not {type(record).__name__} {getattr(record, 'id', '')!r}"
        )


def _check_event_type(spec: Task, event_type: str | None) -> None:
    if spec.name == "AR":
        if event_type not in EVENT_TYPES:
            raise ValueError(
                f"task 'AR' needs event_type, one of {list(EVENT_TYPES)}; got {event_type!r} "
                "(render_all gives one AR example per gold event type)"
            )
    elif event_type is not None:
        raise ValueError(f"task {spec.name!r} takes no event_type (got {event_type!r}); only 'AR' does")


def _check_image(spec: Task, record: Record, image: Image.Image | None) -> None:
    name = getattr(record, "id", "")
    if isinstance(record, TextSentence | SchemaQuestion):
        if image is not None:
            raise ValueError(f"task {spec.name!r} on {type(record).__name__} {name!r}: text records take no image")
        return
    if image is None:
        raise ValueError(f"task {spec.name!r} on {type(record).__name__} {name!r} needs the record's decoded image")
    # A record without a size (imSitu without SWiG, M2E2 converted without images) has no boxes to misplace.
    if isinstance(record, ImageRecord) and record.width > 0 and record.height > 0:
        image_width, image_height = image.size
        expected_height = image_width * record.height / record.width
        if abs(image_height - expected_height) > max(1.0, _ASPECT_TOLERANCE * expected_height):
            raise ValueError(
                f"image record {name!r}: the decoded image is {image_width}x{image_height} but the record's boxes are "
                f"for {record.width}x{record.height}, a different aspect ratio (rotated or wrong image?)"
            )


def _check_size(record: ImageRecord) -> None:
    if record.width <= 0 or record.height <= 0:
        raise ValueError(
            f"image record {record.id!r}: width and height must be positive to normalize its boxes, got "
            f"{record.width}x{record.height} (convert the source with its images so that sizes are known)"
        )


def _meta(record: Record, task: str, event_type: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"task": task, "record_kind": record.kind, "modality": _MODALITIES[type(record)]}
    if isinstance(record, TextSentence):
        meta["tokens"] = list(record.tokens)
    elif isinstance(record, ImageRecord):
        meta.update(width=record.width, height=record.height)
    elif isinstance(record, SchemaQuestion):
        meta.update(event_type=record.event_type, form=record.form)
    if event_type is not None:
        meta["event_type"] = event_type
    return meta


def _meta_get(meta: dict[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"example_meta[{key!r}] must be a {kind.__name__} as render() writes it, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def _schema(roles: dict[str, tuple[str, ...]], *, definitions: bool = False) -> str:
    """The event types with their roles, one per line: ``Life:Die (Instrument, Victim)``; with ``definitions``, each
    followed by ``: `` and its definition (schema-guided prompts)."""
    return "\n".join(
        f"{event_type} ({', '.join(roles[event_type])})" + (f": {DEFINITIONS[event_type]}" if definitions else "")
        for event_type in EVENT_TYPES
    )


def _guided_schema(roles: dict[str, tuple[str, ...]]) -> str:
    return "Event types (argument roles): definition\n" + _schema(roles, definitions=True)


_SCHEMA_SYSTEM = "Answer a question about the event schema: the event types, what they mean and their argument roles."


def _schema_prompt(record: SchemaQuestion) -> str:
    """The user turn of a ts question, from the record's own definition."""
    if record.form == "type_of_definition":
        return (
            f"Definition: {record.definition}\n"
            f"Which event type does this define? Answer one of: {', '.join(EVENT_TYPES)}."
        )
    where = "text" if record.form == "roles" else "images"
    return (
        f"{record.event_type}: {record.definition}\n"
        f"Which argument roles does {record.event_type} take in {where}? Answer them separated by ;, or none."
    )


def _prompt(
    task: str, record: Record, event_type: str | None, boxes: BoxSyntax = PLAIN, schema_guided: bool = False
) -> tuple[str, str]:
    """(system, user text) for a task; the image, if any, is shown before the user text."""
    if isinstance(record, SchemaQuestion):
        return _SCHEMA_SYSTEM, _schema_prompt(record)
    if isinstance(record, RelationPair):
        system = "Classify the relation between two entities of a post and its image. Relations: " + ", ".join(
            RELATION_LABELS
        )
        prompt = (
            f"Text: {_Sentence(record.tokens).text}\nHead entity: {record.head.name}\nTail entity: {record.tail.name}\n"
            "Answer with one relation."
        )
        return system, prompt
    is_text = isinstance(record, TextSentence)
    where = f"Sentence: {_Sentence(record.tokens).text}\n" if is_text else ""  # type: ignore[union-attr]
    source = "sentence" if is_text else "image"
    modality_roles = TEXT_ROLES if is_text else IMAGE_ROLES
    verb = "mentioned in" if is_text else "shown in"
    if task == "EM":
        system = f"Identify the events {verb} the {source}."
        if schema_guided:
            system += "\n" + _guided_schema(modality_roles)
        else:
            system += f" Event types: {', '.join(EVENT_TYPES)}"
        return system, f"{where}List the event types present, separated by ; or write none."
    if task == "AR":
        roles = modality_roles[event_type]  # type: ignore[index]
        asked = f"{where}Event type: {event_type}\nRoles: {', '.join(roles)}\n"
        guide = "\n" + _guided_schema(modality_roles) if schema_guided else ""
        if is_text:
            system = "Extract the arguments of an event from the sentence." + guide
            line = "trigger | role: argument ; role: argument"
            return system, f"{asked}One line per {event_type} event: {line}. Write none if there is no such event."
        system = "Locate the arguments of an event in the image." + guide
        return system, f"{asked}Answer {boxes.example()} ({boxes.note}), or none."
    if task == "joint":
        header_1, header_2 = JOINT_HEADERS
        if schema_guided:
            types = _guided_schema(modality_roles)
        else:
            types = "Event types (argument roles):\n" + _schema(modality_roles)
        system = f"Answer two tasks about the {source}, each after its header, with no other words.\n{types}"
        line = "type | trigger | role: argument ; role: argument" if is_text else f"type | {boxes.example()}"
        note = "" if is_text else f" ({boxes.note})"
        return system, (
            f"{where}Task 1: list the event types {verb} the {source}, separated by ;, or write none.\n"
            f"Task 2: one event per line: {line}{note}; write none if there is no event.\n"
            f"Answer in this form:\n{header_1} <task 1 answer>\n{header_2}\n<task 2 answer>"
        )
    if task == "vs":
        system = "Identify the events shown in the image and which of their roles are visible. Event types (argument "
        return system + "roles):\n" + _schema(IMAGE_ROLES), (
            "One line per event type shown: type | role ; role, listing the roles whose participant is visible. "
            "Write none if there is no event."
        )
    if is_text:
        system = "Extract the events of the sentence. Event types (argument roles):\n" + _schema(TEXT_ROLES)
        line = "type | trigger | role: argument ; role: argument"
        return system, f"{where}One event per line: {line}. Write none if there is no event."
    system = "Extract the events shown in the image. Event types (argument roles):\n" + _schema(IMAGE_ROLES)
    return (
        system,
        f"One event per line: type | {boxes.example()} ({boxes.note}). Write none if there is no event.",
    )


# ---------------------------------------------------------------------------------------------------------------
# Gold structures


def _types_in_order(types: Any) -> tuple[str, ...]:
    present = set(types)
    return tuple(event_type for event_type in EVENT_TYPES if event_type in present)


def _role_rank(roles: tuple[str, ...], role: str) -> int:
    return roles.index(role)


def _gold_text_events(record: TextSentence) -> tuple[ParsedEvent, ...]:
    sentence = _Sentence(record.tokens)
    events = []
    for event in record.events:
        if event.event_type not in TEXT_ROLES:
            continue
        trigger = sentence.trim(_checked_span(record, event.trigger.start, event.trigger.end, "trigger"))
        if trigger is None:
            continue
        roles = TEXT_ROLES[event.event_type]
        arguments = set()
        for argument in event.arguments:
            span = sentence.trim(_checked_span(record, argument.start, argument.end, f"{argument.role} argument"))
            if argument.role in roles and span is not None:
                arguments.add(ParsedArgument(argument.role, text=sentence.value(span), span=span))
        ordered = sorted(arguments, key=lambda arg: (_role_rank(roles, arg.role), arg.span))
        events.append(ParsedEvent(event.event_type, sentence.value(trigger), trigger, tuple(ordered)))
    events.sort(key=lambda event: (event.trigger_span, EVENT_TYPES.index(event.event_type), _args_key(event)))
    return tuple(events)


def _checked_span(record: TextSentence, start: int, end: int, what: str) -> Span:
    if not 0 <= start < end <= len(record.tokens):
        raise ValueError(
            f"sentence {record.id!r}: {what} span [{start}, {end}) is outside its {len(record.tokens)} tokens"
        )
    return (start, end)


def _args_key(event: ParsedEvent) -> tuple[Any, ...]:
    return tuple((arg.role, arg.span or (-1, -1), arg.box or (-1, -1, -1, -1)) for arg in event.arguments)


def _gold_image_events(record: ImageRecord, boxes: BoxSyntax = PLAIN) -> tuple[ParsedEvent, ...]:
    events = []
    for event in record.events:
        if event.event_type not in IMAGE_ROLES:
            continue
        grounded = []
        for argument in event.arguments:
            if argument.box is None or argument.role not in IMAGE_ROLES[event.event_type]:
                continue
            _check_size(record)
            x1, y1, x2, y2 = argument.box
            if x1 > x2 or y1 > y2:
                raise ValueError(
                    f"image record {record.id!r}: {argument.role} box {argument.box} has x1 > x2 or y1 > y2"
                )
            grid = boxes.grid(record.width, record.height)
            quantized = quantize_box(argument.box, record.width, record.height, grid)
            grounded.append(
                ParsedArgument(argument.role, box=dequantize_box(quantized, record.width, record.height, grid))
            )
        events.append(ParsedEvent(event.event_type, arguments=_sorted_unique_boxes(event.event_type, grounded)))
    events.sort(key=lambda event: (EVENT_TYPES.index(event.event_type), _args_key(event)))
    return tuple(events)


def _sorted_unique_boxes(event_type: str, arguments: Sequence[ParsedArgument]) -> tuple[ParsedArgument, ...]:
    roles = IMAGE_ROLES[event_type]
    return tuple(sorted(set(arguments), key=lambda arg: (_role_rank(roles, arg.role), arg.box)))


def _visible_roles(record: ImageRecord) -> tuple[ParsedEvent, ...]:
    """The vs gold: each event type of the image once, in EVENT_TYPES order, with the roles of its image schema that
    some argument of that type fills with a box (boxes are not written, so the image size does not matter)."""
    visible: dict[str, set[str]] = {}
    for event in record.events:
        if event.event_type not in IMAGE_ROLES:
            continue
        roles = visible.setdefault(event.event_type, set())
        roles.update(
            argument.role
            for argument in event.arguments
            if argument.box is not None and argument.role in IMAGE_ROLES[event.event_type]
        )
    return tuple(
        ParsedEvent(
            event_type,
            arguments=tuple(ParsedArgument(role) for role in IMAGE_ROLES[event_type] if role in visible[event_type]),
        )
        for event_type in EVENT_TYPES
        if event_type in visible
    )


def _schema_answer(record: SchemaQuestion) -> Parsed:
    """The ts gold: the roles the question asks for (the record's, in its order), or the defined type."""
    _check_schema_question(record)
    if record.form == "type_of_definition":
        return Parsed(task="ts", event_types=(record.event_type,))
    field_name, _ = _FORM_ROLES[record.form]
    return Parsed(task="ts", roles=getattr(record, field_name))


def _check_schema_question(record: SchemaQuestion) -> None:
    """A schema question is rendered from its own fields, which must stay within the ontology (rmpl_ds.sources.schema
    skips entries that do not) so that the parser, which matches roles against the ontology, reads them back."""
    where = f"schema question {record.id!r}"
    if record.form not in SCHEMA_FORMS:
        raise ValueError(f"{where}: form {record.form!r} is not one of {list(SCHEMA_FORMS)}")
    if record.event_type not in EVENT_TYPES:
        raise ValueError(f"{where}: {record.event_type!r} is not one of the {len(EVENT_TYPES)} event types")
    if not record.definition.strip():
        raise ValueError(f"{where}: the definition is empty")
    for field_name, ontology in _FORM_ROLES.values():
        outside = [role for role in getattr(record, field_name) if role not in ontology[record.event_type]]
        if outside:
            raise ValueError(
                f"{where}: {field_name} {outside} are not roles of {record.event_type} "
                f"(expected some of {list(ontology[record.event_type])})"
            )


# ---------------------------------------------------------------------------------------------------------------
# Strings in a sentence


class _Sentence:
    """A sentence's tokens as one string, and where a string occurs in it on token boundaries.

    Whitespace inside a token is collapsed to one space; tokens that are blank after that take no room, so a
    span never starts or ends on one (:meth:`trim`).
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = [" ".join(token.split()) for token in tokens]
        self.text, self._starts, self._ends = self._index(self.tokens, " ")
        # The same index with every space removed, for strings the model wrote with different spacing.
        self._compact, self._compact_starts, self._compact_ends = self._index(
            [token.replace(" ", "") for token in self.tokens], ""
        )

    @staticmethod
    def _index(tokens: Sequence[str], separator: str) -> tuple[str, dict[int, int], dict[int, int]]:
        pieces: list[str] = []
        starts: dict[int, int] = {}
        ends: dict[int, int] = {}
        position = 0
        for index, token in enumerate(tokens):
            if not token:
                continue
            if pieces:
                position += len(separator)
            starts[position] = index
            position += len(token)
            ends[position] = index + 1
            pieces.append(token)
        return separator.join(pieces), starts, ends

    def trim(self, span: Span) -> Span | None:
        """The span without blank tokens at its ends; None if every token is blank."""
        start, end = span
        while start < end and not self.tokens[start]:
            start += 1
        while end > start and not self.tokens[end - 1]:
            end -= 1
        return (start, end) if start < end else None

    def value(self, span: Span) -> str:
        """The span's text: its non-blank tokens joined by single spaces."""
        return " ".join(token for token in self.tokens[span[0] : span[1]] if token)

    def occurrences(self, value: str) -> list[Span]:
        """Spans whose text is ``value``, in sentence order; if there is none, those equal to it up to whitespace."""
        exact = self._find(self.text, self._starts, self._ends, value)
        if exact:
            return exact
        return self._find(self._compact, self._compact_starts, self._compact_ends, "".join(value.split()))

    @staticmethod
    def _find(text: str, starts: dict[int, int], ends: dict[int, int], needle: str) -> list[Span]:
        found: list[Span] = []
        if not needle:
            return found
        position = text.find(needle)
        while position >= 0:
            end = position + len(needle)
            if position in starts and end in ends:
                found.append((starts[position], ends[end]))
            position = text.find(needle, position + 1)
        return found


def _pick_trigger(occurrences: list[Span], cursor: int, taken: set[Span]) -> Span | None:
    """The trigger rule: first occurrence at or after ``cursor`` not taken by an earlier line of the same type."""
    for rule in (
        lambda span: span[0] >= cursor and span not in taken,
        lambda span: span not in taken,
        lambda span: True,
    ):
        for span in occurrences:
            if rule(span):
                return span
    return None


def _gap(span: Span, anchor: Span) -> int:
    if span[1] <= anchor[0]:
        return anchor[0] - span[1]
    if span[0] >= anchor[1]:
        return span[0] - anchor[1]
    return 0


def _pick_argument(occurrences: list[Span], trigger: Span | None) -> Span | None:
    """The argument rule: the occurrence nearest the trigger, ties to the one after it."""
    if not occurrences:
        return None
    if trigger is None:
        return occurrences[0]
    return min(occurrences, key=lambda span: (_gap(span, trigger), span[0] < trigger[0], span[0]))


def _escape(value: str) -> str:
    escaped = "".join("\\" + char if char in _ESCAPED else char for char in value)
    # A bare "none" would read as "nothing to report".
    return "\\" + escaped if escaped.lower() == NONE else escaped


def _unescape(raw: str) -> str:
    chars = []
    index = 0
    while index < len(raw):
        if raw[index] == "\\" and index + 1 < len(raw):
            index += 1
        chars.append(raw[index])
        index += 1
    return "".join(chars)


def _split(raw: str, separator: str) -> list[str]:
    """Split on unescaped ``separator``; the pieces keep their escapes."""
    pieces: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\\" and index + 1 < len(raw):
            current.append(raw[index : index + 2])
            index += 2
            continue
        if char == separator:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    pieces.append("".join(current))
    return pieces


def _split_marker(raw: str) -> tuple[str, int | None]:
    """``attack#2`` -> (``attack``, 2); an unescaped ``#`` not followed by digits only stays part of the string."""
    pieces = _split(raw, "#")
    if len(pieces) > 1 and _NUMBER.fullmatch(pieces[-1].strip()):
        return "#".join(pieces[:-1]).strip(), int(pieces[-1])
    return raw, None


def _written(sentence: _Sentence, span: Span, chosen: Span | None) -> str:
    """How the renderer writes a gold span: escaped text, plus ``#k`` when the rule would pick another span."""
    value = sentence.value(span)
    if chosen == span:
        return _escape(value)
    return f"{_escape(value)}#{sentence.occurrences(value).index(span) + 1}"


# ---------------------------------------------------------------------------------------------------------------
# Linearization


def _linearize(structure: Parsed, meta: dict[str, Any], boxes: BoxSyntax = PLAIN) -> str:
    task = structure.task
    if task == "r":
        return structure.relation or ""
    if task == "ts":
        return structure.event_types[0] if meta["form"] == "type_of_definition" else " ; ".join(structure.roles) or NONE
    if task == "joint":
        mentions = _linearize(Parsed(task="EM", event_types=structure.event_types), meta, boxes)
        events_task = "t" if meta["modality"] == "text" else "i"
        events = _linearize(Parsed(task=events_task, events=structure.events), meta, boxes)
        return f"{JOINT_HEADERS[0]} {mentions}\n{JOINT_HEADERS[1]}\n{events}"
    if task == "EM":
        return " ; ".join(structure.event_types) or NONE
    if not structure.events:
        return NONE
    if task == "vs":
        return "\n".join(
            " | ".join(field for field in (event.event_type, " ; ".join(arg.role for arg in event.arguments)) if field)
            for event in structure.events
        )
    if meta["modality"] == "image":
        size = (meta["width"], meta["height"])
        if task == "AR":
            return _written_boxes(structure.events[0], size, boxes)
        return "\n".join(
            " | ".join(field for field in (event.event_type, _written_boxes(event, size, boxes)) if field)
            for event in structure.events
        )
    return _written_text_events(structure.events, _Sentence(meta["tokens"]), with_type=task != "AR")


def _written_text_events(events: Sequence[ParsedEvent], sentence: _Sentence, *, with_type: bool) -> str:
    lines = []
    cursor = 0
    taken: set[tuple[str, Span]] = set()
    for event in events:
        trigger = event.trigger_span
        assert trigger is not None, "gold text events always have a trigger span"
        same_type_taken = {span for event_type, span in taken if event_type == event.event_type}
        chosen = _pick_trigger(sentence.occurrences(sentence.value(trigger)), cursor, same_type_taken)
        written_trigger = _written(sentence, trigger, chosen)
        cursor = trigger[0]
        taken.add((event.event_type, trigger))
        arguments = []
        for argument in event.arguments:
            assert argument.span is not None, "gold text arguments always have a span"
            chosen = _pick_argument(sentence.occurrences(sentence.value(argument.span)), trigger)
            arguments.append(f"{argument.role}: {_written(sentence, argument.span, chosen)}")
        fields = [event.event_type] if with_type else []
        fields.append(written_trigger)
        if arguments:
            fields.append(" ; ".join(arguments))
        lines.append(" | ".join(fields))
    return "\n".join(lines)


def _written_boxes(event: ParsedEvent, size: tuple[int, int], boxes: BoxSyntax) -> str:
    width, height = size
    grid = boxes.grid(width, height)
    return " ; ".join(
        boxes.write(argument.role, quantize_box(argument.box, width, height, grid))  # type: ignore[arg-type]
        for argument in event.arguments
    )


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def _match(name: str, allowed: Sequence[str]) -> str | None:
    """``name`` as spelled in ``allowed``, compared exactly and then case-insensitively."""
    name = name.strip()
    if name in allowed:
        return name
    folded = {candidate.lower(): candidate for candidate in allowed}
    return folded.get(name.lower())


def _parse_relation(text: str) -> Parsed:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return Parsed(task="r", errors=1)
    relation = _match(lines[0], RELATION_LABELS)
    errors = (relation is None) + (len(lines) > 1)
    return Parsed(task="r", relation=relation, errors=errors)


def _parse_joint(text: str, meta: dict[str, Any], modality: str, boxes: BoxSyntax) -> Parsed:
    """A joint answer: split at its headers (module docstring), Task 1 read as EM, Task 2 as t or i."""
    if not text.strip():
        return Parsed(task="joint", errors=1)
    found: dict[int, re.Match[str]] = {}
    for match in _JOINT_HEADER.finditer(text):
        found.setdefault(int(match.group(1)), match)
    first, second = found.get(1), found.get(2)
    stray = ""
    if first is not None and second is not None:
        earlier, later = sorted((first, second), key=lambda match: match.start())
        stray = text[: earlier.start()]
        answers = {
            int(earlier.group(1)): text[earlier.end() : later.start()],
            int(later.group(1)): text[later.end() :],
        }
    elif first is not None:
        stray = text[: first.start()]
        line_end = text.find("\n", first.end())
        line_end = len(text) if line_end < 0 else line_end
        answers = {1: text[first.end() : line_end], 2: text[line_end:]}
    elif second is not None:
        answers = {1: text[: second.start()], 2: text[second.end() :]}
    else:
        first_line, _, rest = text.strip().partition("\n")
        answers = {1: first_line, 2: rest}
    errors = (first is None) + (second is None) + bool(stray.strip())
    sections = []
    for task, header, answer in (("EM", first, answers[1]), ("t" if modality == "text" else "i", second, answers[2])):
        if header is None and not answer.strip():
            sections.append(Parsed(task=task))  # nothing where the answer would be: the missing header counted it
        else:
            sections.append(_parse_answer(task, answer, meta, modality, boxes))
    mentions, events = sections
    return Parsed(
        task="joint",
        events=events.events,
        event_types=mentions.event_types,
        errors=errors + mentions.errors + events.errors,
    )


def _items(lines: Sequence[str]) -> list[str]:
    """The non-empty ``;``- or ``,``-separated items of ``lines`` (names never contain either)."""
    return [item for line in lines for item in (piece.strip() for piece in line.replace(",", ";").split(";")) if item]


def _parse_visible_roles(lines: list[str]) -> Parsed:
    """vs lines: ``type | role ; role`` (a type alone has no visible role)."""
    events = []
    errors = 0
    for line in lines:
        fields = [field.strip() for field in line.split("|")]
        event_type = _match(fields[0], EVENT_TYPES)
        if event_type is None:
            errors += 1
            continue
        errors += max(len(fields) - 2, 0)  # roles split by "|" instead of ";"
        roles = []
        for item in _items(fields[1:]):
            role = _match(item, IMAGE_ROLES[event_type])
            if role is None:
                errors += 1
            else:
                roles.append(ParsedArgument(role))
        events.append(ParsedEvent(event_type, arguments=tuple(roles)))
    return Parsed(task="vs", events=tuple(events), errors=errors)


def _parse_schema_answer(lines: list[str], meta: dict[str, Any]) -> Parsed:
    """ts: the defined type (one line), or the asked roles matched against the ontology's roles of the type."""
    form = meta["form"]
    if form == "type_of_definition":
        event_type = _match(lines[0], EVENT_TYPES)
        errors = (event_type is None) + (len(lines) > 1)
        return Parsed(task="ts", event_types=() if event_type is None else (event_type,), errors=errors)
    _, ontology = _FORM_ROLES[form]
    event_type = _meta_get(meta, "event_type", str)
    if event_type not in ontology:
        raise ValueError(f"example_meta['event_type'] must be one of {list(EVENT_TYPES)} as render() writes it")
    roles = []
    errors = 0
    for item in _items(lines):
        role = _match(item, ontology[event_type])
        if role is None:
            errors += 1
        else:
            roles.append(role)
    return Parsed(task="ts", roles=tuple(roles), errors=errors)


def _parse_types(lines: list[str]) -> Parsed:
    found: list[str] = []
    errors = 0
    for line in lines:
        for item in (piece.strip() for piece in line.replace(",", ";").split(";")):
            if not item:
                continue
            event_type = _match(item, EVENT_TYPES)
            if event_type is None:
                errors += 1
            elif event_type not in found:
                found.append(event_type)
    return Parsed(task="EM", event_types=tuple(found), errors=errors)


def _parse_text_events(
    lines: list[str], sentence: _Sentence, fixed_type: str | None
) -> tuple[tuple[ParsedEvent, ...], int]:
    """Text event lines: ``type | trigger | arguments`` (t) or ``trigger | arguments`` (AR, type given)."""
    events: list[ParsedEvent] = []
    errors = 0
    cursor = 0
    taken: set[tuple[str, Span]] = set()
    for line in lines:
        fields = [field.strip() for field in _split(line, "|")]
        if fixed_type is None:
            event_type = _match(_unescape(fields.pop(0)), EVENT_TYPES)
            if event_type is None:
                errors += 1
                continue
        else:
            event_type = fixed_type
        if not fields or not fields[0]:
            errors += 1  # an event with no trigger
            trigger_text, trigger, argument_fields = None, None, fields[1:]
        else:
            trigger_raw, argument_fields = fields[0], fields[1:]
            value, marker = _split_marker(trigger_raw)
            trigger_text = _unescape(value)
            occurrences = sentence.occurrences(trigger_text)
            if not occurrences and len(fields) == 1 and _looks_like_arguments(trigger_raw, event_type):
                # An AR line without its trigger: keep the arguments.
                errors += 1
                trigger_text, trigger, argument_fields = None, None, fields
            else:
                same_type_taken = {span for taken_type, span in taken if taken_type == event_type}
                rule = functools.partial(_pick_trigger, cursor=cursor, taken=same_type_taken)
                trigger, located_errors = _locate(occurrences, marker, rule)
                errors += located_errors
        if trigger is not None:
            cursor = trigger[0]
            taken.add((event_type, trigger))
        errors += max(len(argument_fields) - 1, 0)  # arguments split by "|" instead of ";"
        arguments: list[ParsedArgument] = []
        for field in argument_fields:
            for item in _split(field, ";"):
                argument, item_errors = _parse_text_argument(item, event_type, sentence, trigger)
                errors += item_errors
                if argument is not None:
                    arguments.append(argument)
        events.append(ParsedEvent(event_type, trigger_text, trigger, tuple(arguments)))
    return tuple(events), errors


def _looks_like_arguments(raw: str, event_type: str) -> bool:
    role = _split(raw, ";")[0].split(":", 1)[0]
    return ":" in raw and _match(_unescape(role), TEXT_ROLES[event_type]) is not None


def _locate(
    occurrences: list[Span], marker: int | None, rule: Callable[[list[Span]], Span | None]
) -> tuple[Span | None, int]:
    """(span, errors): the marked occurrence if the marker is valid, else the rule's; no occurrence is an error."""
    if not occurrences:
        return None, 1
    if marker is not None:
        if 1 <= marker <= len(occurrences):
            return occurrences[marker - 1], 0
        return rule(occurrences), 1
    return rule(occurrences), 0


def _parse_text_argument(
    item: str, event_type: str, sentence: _Sentence, trigger: Span | None
) -> tuple[ParsedArgument | None, int]:
    if not item.strip():
        return None, 0  # a doubled or trailing separator loses nothing
    role_text, colon, raw = item.partition(":")
    role = _match(_unescape(role_text), TEXT_ROLES[event_type])
    value, marker = _split_marker(raw.strip())
    text = _unescape(value).strip()
    if not colon or role is None or not text:
        return None, 1
    span, errors = _locate(sentence.occurrences(text), marker, functools.partial(_pick_argument, trigger=trigger))
    return ParsedArgument(role, text=text, span=span), errors


# A field separator of an image line: a bar that is not part of a ``<|special|>`` token of a native box syntax.
_FIELD = re.compile(r"(?<!<)\|(?!>)")


def _parse_image_events(
    lines: list[str], size: tuple[int, int], boxes: BoxSyntax
) -> tuple[tuple[ParsedEvent, ...], int]:
    """Image event lines: ``type | role: box ; role: box``."""
    events = []
    errors = 0
    for line in lines:
        fields = [field.strip() for field in _FIELD.split(line)]
        event_type = _match(fields[0], EVENT_TYPES)
        if event_type is None:
            errors += 1
            continue
        errors += max(len(fields) - 2, 0)
        arguments, argument_errors = _parse_box_arguments(fields[1:], event_type, size, boxes)
        events.append(ParsedEvent(event_type, arguments=arguments))
        errors += argument_errors
    return tuple(events), errors


def _parse_image_arguments(lines: list[str], event_type: str, size: tuple[int, int], boxes: BoxSyntax) -> Parsed:
    """Image AR: ``role: box ; role: box`` (boxes on several lines are read as one list)."""
    fields = [field.strip() for line in lines for field in _FIELD.split(line)]
    errors = max(len(fields) - len(lines), 0)
    arguments, argument_errors = _parse_box_arguments(fields, event_type, size, boxes)
    events = (ParsedEvent(event_type, arguments=arguments),) if arguments else ()
    return Parsed(task="AR", events=events, errors=errors + argument_errors)


def _parse_box_arguments(
    fields: Sequence[str], event_type: str, size: tuple[int, int], boxes: BoxSyntax
) -> tuple[tuple[ParsedArgument, ...], int]:
    arguments: list[ParsedArgument] = []
    errors = 0
    grid = boxes.grid(*size)
    for field in fields:
        for item in field.split(";"):
            if not item.strip():
                continue
            role_text, found, malformed = boxes.read_item(item)
            role = _match(role_text, IMAGE_ROLES[event_type]) if role_text is not None else None
            if role is None:
                errors += 1
                continue
            errors += malformed
            for box in found:
                on_grid = _on_grid(box, grid)
                if on_grid is None:
                    errors += 1
                else:
                    arguments.append(ParsedArgument(role, box=dequantize_box(on_grid, *size, grid)))
    return tuple(arguments), errors


def _on_grid(box: Box | None, grid: tuple[int, int]) -> Box | None:
    """A read box within the grid (a coordinate equal to the grid size, the last bin's far edge, is the last bin);
    None beyond it."""
    if box is None:
        return None
    limits = (grid[0], grid[1], grid[0], grid[1])
    if any(value > limit for value, limit in zip(box, limits, strict=True)):
        return None
    x1, y1, x2, y2 = (min(value, limit - 1) for value, limit in zip(box, limits, strict=True))
    return (x1, y1, x2, y2)
