"""Unified records: what every converter produces and what shards store (as JSON).

Records are frozen dataclasses, one kind per source family. Spans are token offsets with an exclusive end
(as in every real format we read); boxes are ``(x1, y1, x2, y2)`` in pixels of the record's own image, the
same image that is stored next to the record in its shard. A record with no events is a negative example.

A :class:`ChatRecord` is a conversation of a user's own instruction data (rmpl_ds.sources.chat): every turn as
written, images by position; it renders only for the ``chat`` task.

Two kinds serve the training strategies of related methods: a :class:`CaptionPair` is an unlabeled image with its
caption (X-MTL's pseudo-label self-training reads them, rmpl_ds.pseudo); a :class:`SchemaQuestion` is one question
about the event ontology (LLaVA-MS-PIT's textual-schema stage, rmpl_ds.sources.schema).

``to_json(record)`` / ``from_json(obj)`` round-trip a record through plain JSON types; the ``kind`` key says
which class to rebuild.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Trigger:
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class TextArgument:
    role: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class TextEvent:
    """An event mention in a sentence.

    ``setting`` says where an M2E2 event comes from (``text_only`` or ``multimedia``); empty elsewhere.
    """

    event_type: str
    trigger: Trigger
    arguments: tuple[TextArgument, ...] = ()
    setting: str = ""


@dataclass(frozen=True)
class TextSentence:
    """A tokenized sentence with its events (ACE 2005, the text side of M2E2)."""

    kind: ClassVar[str] = "text_sentence"
    id: str
    source: str
    split: str
    tokens: tuple[str, ...]
    events: tuple[TextEvent, ...] = ()
    document_id: str = ""


@dataclass(frozen=True)
class VisualArgument:
    """A role filler in an image: ``box`` is None when the role is not grounded (SWiG's [-1,-1,-1,-1]).

    ``noun`` is the imSitu noun gloss when known; ``flag`` keeps M2E2's undocumented box flag ("1"/"0").
    """

    role: str
    box: Box | None
    noun: str = ""
    flag: str = ""


@dataclass(frozen=True)
class ImageEvent:
    event_type: str
    arguments: tuple[VisualArgument, ...] = ()
    verb: str = ""
    setting: str = ""


@dataclass(frozen=True)
class ImageRecord:
    """An image with its events (imSitu/SWiG situations mapped to M2E2 types, the image side of M2E2).

    ``image`` is the original file name; the shard stores the image bytes beside the record.
    """

    kind: ClassVar[str] = "image_record"
    id: str
    source: str
    split: str
    image: str
    width: int
    height: int
    events: tuple[ImageEvent, ...] = ()
    document_id: str = ""


@dataclass(frozen=True)
class EntityMention:
    name: str
    start: int
    end: int


@dataclass(frozen=True)
class RelationPair:
    """An MNRE entity pair in a tweet with its image and its relation label (``None`` = no relation)."""

    kind: ClassVar[str] = "relation_pair"
    id: str
    source: str
    split: str
    tokens: tuple[str, ...]
    head: EntityMention
    tail: EntityMention
    relation: str
    image: str


@dataclass(frozen=True)
class CrossMediaLink:
    """One line of M2E2's crossmedia_coref.txt: a sentence and an image that mention the same event."""

    kind: ClassVar[str] = "crossmedia_link"
    sentence_id: str
    image_id: str
    event_type: str


@dataclass(frozen=True)
class ChatPart:
    """A piece of a turn, in order: ``text``, or the image ``image`` (an index into the record's ``images``)."""

    text: str = ""
    image: int | None = None


@dataclass(frozen=True)
class ChatTurn:
    """One turn of a conversation: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    parts: tuple[ChatPart, ...]


@dataclass(frozen=True)
class ChatRecord:
    """A conversation from a chat dataset (OpenAI messages, ShareGPT, LLaVA; rmpl_ds.sources.chat).

    ``turns``: an optional system turn, then user and assistant turns alternating, ending with an assistant turn.
    ``images``: where each image came from (the path as the dataset wrote it, or ``<file>:<row>:<column>[i]`` for
    bytes stored in the dataset), in the order the turns show them; the shard stores image ``i`` as member
    ``{i}.jpg`` (or ``{i}.png``) beside the record.
    """

    kind: ClassVar[str] = "chat"
    id: str
    source: str
    split: str
    turns: tuple[ChatTurn, ...]
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionPair:
    """An unlabeled image with its caption (an image-caption corpus such as X-MTL's VOA pairs).

    ``tokens``: the caption, tokenized; ``image``: the file name (the shard stores the image bytes beside the
    record), ``width`` x ``height`` its size in pixels.
    """

    kind: ClassVar[str] = "caption_pair"
    id: str
    source: str
    split: str
    image: str
    width: int
    height: int
    tokens: tuple[str, ...]
    document_id: str = ""


@dataclass(frozen=True)
class SchemaQuestion:
    """One question about an event type of the ontology (the ``ts`` task of rmpl_ds.tasks): its definition and role
    inventories, and which question (``form``, one of ``rmpl_ds.tasks.SCHEMA_FORMS``) the record asks.

    The prompt shows ``definition`` as written and the target lists the asked roles in the order given here, so a
    schema file (rmpl_ds.sources.schema) can word definitions its own way; the roles must be the ontology's roles of
    the type in that modality (a subset, any order)."""

    kind: ClassVar[str] = "schema_question"
    id: str
    source: str
    split: str
    event_type: str
    form: str
    definition: str
    text_roles: tuple[str, ...]
    image_roles: tuple[str, ...]


Record = TextSentence | ImageRecord | RelationPair | CrossMediaLink | ChatRecord | CaptionPair | SchemaQuestion
RECORD_KINDS: dict[str, type] = {
    cls.kind: cls
    for cls in (TextSentence, ImageRecord, RelationPair, CrossMediaLink, ChatRecord, CaptionPair, SchemaQuestion)
}


def to_json(record: Record) -> dict[str, Any]:
    """A record as plain JSON types, with its ``kind``."""
    return {"kind": record.kind, **dataclasses.asdict(record)}


def from_json(obj: dict[str, Any]) -> Record:
    """Rebuild a record written by :func:`to_json`; raises ValueError on an unknown kind or bad fields."""
    kind = obj.get("kind")
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(RECORD_KINDS)}")
    fields = {key: value for key, value in obj.items() if key != "kind"}
    return _build(RECORD_KINDS[kind], fields)


def _build(cls: type, fields: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = set(fields) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{name: _convert(hints[name], value) for name, value in fields.items()})


def _convert(hint: Any, value: Any) -> Any:
    """Convert JSON lists back to tuples and dicts back to nested dataclasses, following the type hints."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _convert(inner, value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item) for item in value)
        return tuple(_convert(arg, item) for arg, item in zip(args, value, strict=True))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    return value
