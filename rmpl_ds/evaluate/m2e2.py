"""The M2E2 scorer: strict, set-based P/R/F1 with raw counts, in the text-only, image-only and multimedia settings.

Published M2E2 scorers disagree in many details (shared/notes/M2E2_SCORING.md, B.3-B.6); this one follows the
strict contract of B.7 and the rules in :data:`RULES`, which `rmpl-ds score --help` prints word for word.

* :func:`score_m2e2` is the pure core: gold (:class:`~rmpl_ds.sources.m2e2.M2E2Gold`, records only) and
  :class:`Predictions` in, :class:`M2E2Scores` out. No I/O, no randomness, and the order of the predictions
  does not matter.
* :func:`parse_prediction` / :func:`read_predictions` turn prediction lines (JSON Lines) into
  :class:`Predictions`; :func:`prediction_to_json` is the inverse, for writers of prediction files.
* :func:`gold_as_predictions` renders the gold as a prediction set that scores 100 everywhere (tests, sanity
  checks of a pipeline) and :func:`gold_counts` gives the raw counts of the release.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds import atomic
from rmpl_ds.errors import UserError
from rmpl_ds.ontology import EVENT_TYPES

if TYPE_CHECKING:
    from rmpl_ds.records import TextSentence
    from rmpl_ds.sources.m2e2 import M2E2Gold

DEFAULT_IOU_THRESHOLD = 0.5
TEXT_ONLY = "text_only"
IMAGE_ONLY = "image_only"
MULTIMEDIA = "multimedia"
SETTINGS: tuple[str, ...] = (TEXT_ONLY, IMAGE_ONLY, MULTIMEDIA)
UNION_SETTINGS: tuple[str, ...] = ("text", "image")
TASKS: tuple[str, ...] = ("event_mention", "argument_role")
METRICS: tuple[str, ...] = ("p", "r", "f1", "macro_f1", "tp", "pred", "gold")
IMAGE_SUFFIX = ".jpg"

RULES = """\
Scoring rules
  Every score is over sets of units: a duplicate prediction changes nothing, and gold items that share a
  unit count once (two events of the same type in one sentence are one event-mention unit; an argument that
  both hold is one argument unit; identical boxes of one role are one box). P = tp/pred, R = tp/gold,
  F1 = 2PR/(P+R), in percent, 0 when a denominator is 0; tp, pred and gold are reported with them.
  macro_f1 is the mean of the per-event-type F1 over the types that have gold or predicted units.

Prediction lines (JSON Lines, one event per line; blank lines are skipped)
  text event:       {"sentence_id": S, "event_type": T, "trigger": [start, end] (optional), "arguments": [...]}
  image event:      {"image_id": I, "event_type": T, "arguments": [...]}
  multimedia event: {"sentence_id": S, "image_id": I, "event_type": T, "arguments": [...]}
  argument: {"role": R, "span": [start, end]} | {"role": R, "text": "..."} | {"role": R, "box": [x1, y1, x2, y2]}
  Spans are token offsets with an exclusive end; boxes are pixels of the original image (x1 <= x2, y1 <= y2).
  "arguments" may be left out; a span argument may also carry "text" (the span is used); a trailing ".jpg"
  of an image id is removed; event_type is one of the 8 M2E2 types. Any other line is malformed: an error
  naming the file and line (exit 2), or with --skip-bad-lines a skipped line, counted in the output.
  Text lines are scored only in text-only and union.text, image lines only in image-only and union.image,
  multimedia lines only in multimedia: write every text and image event found as its own line, and every
  cross-media pair as a multimedia line.

Text-only (gold: text_only_event.json)
  event mention: (sentence_id, event_type); trigger variant: (sentence_id, trigger start, end, event_type),
  where a line without a trigger is a unit that never matches.
  argument: (sentence_id, event_type, role, span). An argument given as text stands for the gold argument of
  the same (sentence_id, event_type, role) whose text, either the annotation's "text" or its tokens joined
  by spaces, is equal after normalization (Unicode NFKC, case folded, runs of whitespace collapsed,
  surrounding whitespace and punctuation stripped); when several gold arguments there have that text, it
  stands for one that no other prediction names, if any. So the same argument as span and as text counts
  once, and a text that equals no gold argument is one wrong unit.
  ignored: lines whose sentence is not in text_only_event.json, and lines that stand for a gold multimedia
  text event rather than a text-only one; their arguments go with them. A line with a trigger stands for
  the gold event of that (sentence_id, trigger start, end, event_type) if either text file has one, and is
  ignored when only text_multimedia_event.json has it. Otherwise (no trigger, or one of no gold event) the
  line is ignored when its (sentence_id, event_type) is a gold multimedia text event and not a gold
  text-only one. So a sentence holding a text-only and a multimedia event of the same type (three in the
  release) keeps them apart by trigger, and a line for it without a trigger counts in text-only.

Image-only (gold: image_only_event.json)
  event mention: (image_id, event_type); argument: (image_id, event_type, role, box). Within each
  (image_id, event_type, role) predicted and gold boxes are matched one to one, greedily by decreasing IoU
  (ties: smaller coordinates first); a pair matches when IoU >= threshold (inclusive; --iou-threshold,
  default 0.5). IoU uses continuous coordinates: area = (x2-x1)*(y2-y1), IoU = intersection / union. A
  box's flag is not used: "0" (crowd) boxes are gold boxes like the others.
  ignored: lines for images of image_multimedia_event.json unless they match a gold image-only event.
  Other image ids are not checked against a list (the release lists only images with events), so a line
  for any other image counts.

Multimedia (gold: the crossmedia_coref.txt triples)
  event mention: (sentence_id, image_id, event_type); every multimedia line counts (no line is ignored
  and pairs are not restricted to gold multimedia sentences or images).
  argument: text arguments keyed (sentence_id, event_type, role, span) and boxes keyed (image_id,
  event_type, role, box), pooled in one count and each matched by its rule above. The gold of a triple is
  the arguments of its sentence's multimedia text events of the triple's type and the boxes of its image's
  multimedia image events of that type (2 real triples disagree in type with their image and so bring text
  arguments only); a sentence or image in several triples brings its arguments once.

Union (what older work calls text-only and image-only)
  union text: gold = the events of both text files, predictions = the text lines, units as in text-only;
  lines whose sentence is in neither text file are ignored.
  union image: gold = the events of both image files, predictions = the image lines; none is ignored.

--json prints one object:
  {"event_mention": {"text_only": S, "image_only": S, "multimedia": S}, "argument_role": {same keys},
   "union": {"event_mention": {"text": S, "image": S}, "argument_role": {"text": S, "image": S}},
   "event_mention_trigger": {"text_only": S, "union_text": S},
   "gold_counts": {...}, "predictions": {...}, "iou_threshold": t}
  where S = {"p", "r", "f1", "macro_f1", "tp", "pred", "gold"} (percentages 0-100). gold_counts holds the
  raw sizes of the release (the full release: 1,105 + 192 = 1,297 text events, 188 + 203 = 391 image events,
  309 triples); the gold of S counts units, which can be fewer.
"""

Span = tuple[int, int]
BoxCoordinates = tuple[float, float, float, float]
# A unit's first element is its event type, so per-type tallies need no lookup.
Unit = tuple[Any, ...]


# --- predictions ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextArgumentPrediction:
    """A text argument: exactly one of ``span`` (token offsets, exclusive end) and ``text`` is set."""

    role: str
    span: Span | None = None
    text: str | None = None


@dataclass(frozen=True)
class BoxArgumentPrediction:
    """A visual argument: ``box`` is (x1, y1, x2, y2) in pixels of the original image."""

    role: str
    box: BoxCoordinates


@dataclass(frozen=True)
class TextEventPrediction:
    sentence_id: str
    event_type: str
    trigger: Span | None = None
    arguments: tuple[TextArgumentPrediction, ...] = ()


@dataclass(frozen=True)
class ImageEventPrediction:
    image_id: str
    event_type: str
    arguments: tuple[BoxArgumentPrediction, ...] = ()


@dataclass(frozen=True)
class MultimediaEventPrediction:
    sentence_id: str
    image_id: str
    event_type: str
    text_arguments: tuple[TextArgumentPrediction, ...] = ()
    image_arguments: tuple[BoxArgumentPrediction, ...] = ()


EventPrediction = TextEventPrediction | ImageEventPrediction | MultimediaEventPrediction


@dataclass(frozen=True)
class Predictions:
    """All predicted events of a system, by kind; ``skipped`` describes lines left out (``file:line: why``)."""

    text: tuple[TextEventPrediction, ...] = ()
    image: tuple[ImageEventPrediction, ...] = ()
    multimedia: tuple[MultimediaEventPrediction, ...] = ()
    skipped: tuple[str, ...] = ()

    @classmethod
    def of(cls, events: Iterable[EventPrediction], skipped: Iterable[str] = ()) -> Predictions:
        """Sort a mixed sequence of predicted events by kind (order is kept within each kind)."""
        events = list(events)
        return cls(
            text=tuple(e for e in events if isinstance(e, TextEventPrediction)),
            image=tuple(e for e in events if isinstance(e, ImageEventPrediction)),
            multimedia=tuple(e for e in events if isinstance(e, MultimediaEventPrediction)),
            skipped=tuple(skipped),
        )

    def events(self) -> Iterator[EventPrediction]:
        yield from self.text
        yield from self.image
        yield from self.multimedia


# --- scores -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    tp: int = 0
    pred: int = 0
    gold: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.pred + other.pred, self.gold + other.gold)

    @property
    def f1(self) -> float:
        """F1 in percent; 2tp/(pred+gold) equals 2PR/(P+R) and is 0 (not NaN) when nothing was predicted."""
        total = self.pred + self.gold
        return 200.0 * self.tp / total if total else 0.0


@dataclass(frozen=True)
class Score:
    """Micro counts of one setting and the same counts per event type (for the macro average)."""

    tp: int
    pred: int
    gold: int
    per_type: Mapping[str, Counts] = field(default_factory=dict)

    @classmethod
    def from_per_type(cls, per_type: Mapping[str, Counts]) -> Score:
        total = sum(per_type.values(), Counts())
        return cls(total.tp, total.pred, total.gold, dict(sorted(per_type.items())))

    @property
    def precision(self) -> float:
        return 100.0 * self.tp / self.pred if self.pred else 0.0

    @property
    def recall(self) -> float:
        return 100.0 * self.tp / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        return Counts(self.tp, self.pred, self.gold).f1

    @property
    def macro_f1(self) -> float:
        """Mean per-type F1 over the types with gold or predicted units (0 when there is none)."""
        present = [counts for counts in self.per_type.values() if counts.pred or counts.gold]
        return sum(counts.f1 for counts in present) / len(present) if present else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {
            "p": self.precision,
            "r": self.recall,
            "f1": self.f1,
            "macro_f1": self.macro_f1,
            "tp": self.tp,
            "pred": self.pred,
            "gold": self.gold,
        }


@dataclass(frozen=True)
class M2E2Scores:
    """Everything :func:`score_m2e2` computes; :meth:`to_json` is the `rmpl-ds score --json` object.

    Attributes:
        event_mention / argument_role: setting (``text_only``, ``image_only``, ``multimedia``) -> score.
        union_event_mention / union_argument_role: ``text`` / ``image`` -> score over both files of a modality.
        trigger: ``text_only`` / ``union_text`` -> the event-mention score with trigger offsets in the unit.
        gold_counts: :func:`gold_counts` of the gold.
        prediction_counts: lines read per kind, lines skipped, and per setting the distinct predicted events
            ignored (text: sentence, type and trigger; image: image and type).
    """

    event_mention: Mapping[str, Score]
    argument_role: Mapping[str, Score]
    union_event_mention: Mapping[str, Score]
    union_argument_role: Mapping[str, Score]
    trigger: Mapping[str, Score]
    gold_counts: Mapping[str, int]
    prediction_counts: Mapping[str, Any]
    iou_threshold: float

    def to_json(self) -> dict[str, Any]:
        def block(scores: Mapping[str, Score]) -> dict[str, Any]:
            return {name: score.to_json() for name, score in scores.items()}

        return {
            "event_mention": block(self.event_mention),
            "argument_role": block(self.argument_role),
            "union": {
                "event_mention": block(self.union_event_mention),
                "argument_role": block(self.union_argument_role),
            },
            "event_mention_trigger": block(self.trigger),
            "gold_counts": dict(self.gold_counts),
            "predictions": dict(self.prediction_counts),
            "iou_threshold": self.iou_threshold,
        }


# --- matching primitives ----------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """The form argument texts are compared in: NFKC, case folded, whitespace collapsed, edges stripped.

    Edges are whitespace and Unicode punctuation (categories P*), so ``"Washington, D.C."`` and
    ``"washington, d.c"`` are equal but inner punctuation still counts.
    """
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def box_iou(a: BoxCoordinates, b: BoxCoordinates) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in continuous coordinates (0 for empty unions).

    Continuous means area = (x2 - x1) * (y2 - y1), not the +1 pixel-count convention of some detection code, so
    (0, 0, 2, 1) and (0, 0, 1, 1) have IoU exactly 0.5.
    """
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    intersection = inter_w * inter_h if inter_w > 0 and inter_h > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def match_boxes(
    predicted: Iterable[BoxCoordinates], gold: Iterable[BoxCoordinates], threshold: float = DEFAULT_IOU_THRESHOLD
) -> int:
    """How many distinct predicted boxes match distinct gold boxes one to one at IoU >= ``threshold``.

    Greedy by decreasing IoU with ties broken by the smaller (predicted, gold) coordinates, so the result does not
    depend on input order. Greedy can fall short of a maximum matching only when a box overlaps two others
    at ≥ threshold, which for threshold ≥ 0.5 requires nearly identical gold boxes; it is what detection
    benchmarks do.
    """
    predicted_boxes = sorted(set(predicted))
    gold_boxes = sorted(set(gold))
    pairs = []
    for p_index, p_box in enumerate(predicted_boxes):
        for g_index, g_box in enumerate(gold_boxes):
            iou = box_iou(p_box, g_box)
            if iou >= threshold:
                pairs.append((-iou, p_index, g_index))
    pairs.sort()
    used_predicted: set[int] = set()
    used_gold: set[int] = set()
    for _, p_index, g_index in pairs:
        if p_index not in used_predicted and g_index not in used_gold:
            used_predicted.add(p_index)
            used_gold.add(g_index)
    return len(used_predicted)


class _Tally:
    """Per-event-type tp / pred / gold, filled while scoring one setting."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    def add(self, event_type: str, tp: int = 0, pred: int = 0, gold: int = 0) -> None:
        entry = self.counts[event_type]
        entry[0] += tp
        entry[1] += pred
        entry[2] += gold

    def score(self) -> Score:
        return Score.from_per_type({t: Counts(*values) for t, values in self.counts.items()})


def _score_units(gold: set[Unit], predicted: set[Unit]) -> Score:
    tally = _Tally()
    for unit in gold:
        tally.add(unit[0], gold=1)
    for unit in predicted:
        tally.add(unit[0], tp=int(unit in gold), pred=1)
    return tally.score()


# Gold text arguments grouped by (event_type, sentence_id, role): span -> the normalized texts it may be given as.
TextArgumentGold = dict[Unit, dict[Span, set[str]]]
# Gold boxes grouped by (event_type, image_id, role).
BoxGold = dict[Unit, set[BoxCoordinates]]


@dataclass
class _PredictedTextArguments:
    spans: dict[Unit, set[Span]] = field(default_factory=lambda: defaultdict(set))
    texts: dict[Unit, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, event_type: str, sentence_id: str, arguments: Iterable[TextArgumentPrediction]) -> None:
        for argument in arguments:
            group = (event_type, sentence_id, argument.role)
            if argument.span is not None:
                self.spans[group].add(argument.span)
            else:
                self.texts[group].add(normalize_text(argument.text or ""))


def _tally_text_arguments(tally: _Tally, gold: TextArgumentGold, predicted: _PredictedTextArguments) -> None:
    for group, spans in gold.items():
        tally.add(group[0], gold=len(spans))
    for group in predicted.spans.keys() | predicted.texts.keys():
        gold_spans = gold.get(group, {})
        resolved = set(predicted.spans.get(group, ()))
        unresolved = 0
        for text in sorted(predicted.texts.get(group, ())):
            candidates = sorted(span for span, texts in gold_spans.items() if text in texts)
            if not candidates:
                unresolved += 1
                continue
            # A text names a gold argument; if every argument it can name is predicted already, it is a duplicate.
            fresh = [span for span in candidates if span not in resolved]
            resolved.add(fresh[0] if fresh else candidates[0])
        tally.add(group[0], tp=len(resolved & gold_spans.keys()), pred=len(resolved) + unresolved)


def _tally_boxes(tally: _Tally, gold: BoxGold, predicted: Mapping[Unit, set[BoxCoordinates]], threshold: float) -> None:
    for group, boxes in gold.items():
        tally.add(group[0], gold=len(boxes))
    for group, boxes in predicted.items():
        tally.add(group[0], tp=match_boxes(boxes, gold.get(group, ()), threshold), pred=len(boxes))


# --- gold -------------------------------------------------------------------------------------------------------


@dataclass
class _GoldIndex:
    """The gold as units, built once per call of :func:`score_m2e2`."""

    text_events: dict[str, set[Unit]] = field(default_factory=lambda: defaultdict(set))  # setting -> {(t, s)}
    triggers: dict[str, set[Unit]] = field(default_factory=lambda: defaultdict(set))  # setting -> {(t, s, b, e)}
    text_arguments: dict[str, TextArgumentGold] = field(default_factory=dict)  # setting -> groups
    text_only_sentences: set[str] = field(default_factory=set)
    all_sentences: set[str] = field(default_factory=set)
    image_events: dict[str, set[Unit]] = field(default_factory=lambda: defaultdict(set))  # setting -> {(t, i)}
    boxes: dict[str, BoxGold] = field(default_factory=dict)  # setting -> groups
    multimedia_images: set[str] = field(default_factory=set)
    triples: set[Unit] = field(default_factory=set)  # {(t, s, i)}
    multimedia_text_arguments: TextArgumentGold = field(default_factory=dict)
    multimedia_boxes: BoxGold = field(default_factory=dict)

    @classmethod
    def build(cls, gold: M2E2Gold) -> _GoldIndex:
        index = cls()
        text_groups: dict[str, TextArgumentGold] = {TEXT_ONLY: {}, MULTIMEDIA: {}}
        for sentence in gold.sentences:
            index.all_sentences.add(sentence.id)
            if _in_text_only_file(sentence):
                index.text_only_sentences.add(sentence.id)
            for event in sentence.events:
                unit = (event.event_type, sentence.id)
                index.text_events[event.setting].add(unit)
                index.triggers[event.setting].add((*unit, event.trigger.start, event.trigger.end))
                groups = text_groups.setdefault(event.setting, {})
                for argument in event.arguments:
                    spans = groups.setdefault((*unit, argument.role), {})
                    spans.setdefault((argument.start, argument.end), set()).update(
                        {
                            normalize_text(argument.text),
                            normalize_text(" ".join(sentence.tokens[argument.start : argument.end])),
                        }
                    )
        index.text_arguments = {TEXT_ONLY: text_groups[TEXT_ONLY], "all": _merge_text_groups(text_groups.values())}
        box_groups: dict[str, BoxGold] = {IMAGE_ONLY: {}, MULTIMEDIA: {}}
        for image in gold.images:
            for event in image.events:
                unit = (event.event_type, image.id)
                index.image_events[event.setting].add(unit)
                if event.setting == MULTIMEDIA:
                    index.multimedia_images.add(image.id)
                groups = box_groups.setdefault(event.setting, {})
                for argument in event.arguments:
                    if argument.box is not None:
                        groups.setdefault((*unit, argument.role), set()).add(tuple(argument.box))
        index.boxes = {IMAGE_ONLY: box_groups[IMAGE_ONLY], "all": _merge_box_groups(box_groups.values())}
        # A triple's arguments are those of its sentence's and its image's multimedia events of the triple's type;
        # keyed without the pair, a sentence or image in several triples brings them once.
        triple_text_events = set()
        triple_image_events = set()
        for link in gold.coref:
            index.triples.add((link.event_type, link.sentence_id, link.image_id))
            triple_text_events.add((link.event_type, link.sentence_id))
            triple_image_events.add((link.event_type, link.image_id))
        index.multimedia_text_arguments = {
            group: spans for group, spans in text_groups[MULTIMEDIA].items() if group[:2] in triple_text_events
        }
        index.multimedia_boxes = {
            group: boxes for group, boxes in box_groups[MULTIMEDIA].items() if group[:2] in triple_image_events
        }
        return index


def _in_text_only_file(sentence: TextSentence) -> bool:
    """Whether a merged sentence comes from text_only_event.json.

    The merged sentences keep no file membership, so it is recovered from the settings: a sentence is in that
    file iff it has a text-only event or no event at all (every record of text_multimedia_event.json holds one).
    """
    return not sentence.events or any(event.setting == TEXT_ONLY for event in sentence.events)


def _merge_text_groups(parts: Iterable[TextArgumentGold]) -> TextArgumentGold:
    merged: TextArgumentGold = {}
    for part in parts:
        for group, spans in part.items():
            for span, texts in spans.items():
                merged.setdefault(group, {}).setdefault(span, set()).update(texts)
    return merged


def _merge_box_groups(parts: Iterable[BoxGold]) -> BoxGold:
    merged: BoxGold = {}
    for part in parts:
        for group, boxes in part.items():
            merged.setdefault(group, set()).update(boxes)
    return merged


def gold_counts(gold: M2E2Gold) -> dict[str, int]:
    """Raw sizes of the release, counted per file (before any unit is formed).

    On the full public release: text_only_events 1,105 + text_multimedia_events 192 = text_events 1,297;
    image_only_events 188 + image_multimedia_events 203 = image_events 391; coref_triples 309.
    """
    counts = {
        "sentences": len(gold.sentences),
        "text_only_sentences": 0,
        "text_only_events": 0,
        "text_only_arguments": 0,
        "text_multimedia_events": 0,
        "text_multimedia_arguments": 0,
        "text_events": 0,
        "image_only_events": 0,
        "image_only_boxes": 0,
        "image_multimedia_events": 0,
        "image_multimedia_boxes": 0,
        "image_events": 0,
        "coref_triples": len(gold.coref),
        "coref_distinct_triples": len({(c.sentence_id, c.image_id, c.event_type) for c in gold.coref}),
    }
    for sentence in gold.sentences:
        counts["text_only_sentences"] += int(_in_text_only_file(sentence))
        for event in sentence.events:
            prefix = "text_only" if event.setting == TEXT_ONLY else "text_multimedia"
            counts[f"{prefix}_events"] += 1
            counts[f"{prefix}_arguments"] += len(event.arguments)
            counts["text_events"] += 1
    for image in gold.images:
        for event in image.events:
            prefix = "image_only" if event.setting == IMAGE_ONLY else "image_multimedia"
            counts[f"{prefix}_events"] += 1
            counts[f"{prefix}_boxes"] += sum(1 for argument in event.arguments if argument.box is not None)
            counts["image_events"] += 1
    return counts


# --- scoring ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextSettingScores:
    event_mention: Score
    trigger: Score
    argument_role: Score
    ignored: int


def _score_text_setting(
    predictions: Iterable[TextEventPrediction],
    gold_events: set[Unit],
    gold_triggers: set[Unit],
    gold_arguments: TextArgumentGold,
    keep: Callable[[Unit, Unit], bool],
) -> _TextSettingScores:
    """``keep(event unit, trigger unit)`` says whether a line counts in this setting."""
    events: set[Unit] = set()
    triggers: set[Unit] = set()
    ignored: set[Unit] = set()
    arguments = _PredictedTextArguments()
    for prediction in predictions:
        unit = (prediction.event_type, prediction.sentence_id)
        # None offsets never equal gold ints: a line without a trigger is a unit that cannot match.
        start, end = prediction.trigger if prediction.trigger is not None else (None, None)
        trigger_unit = (*unit, start, end)
        if not keep(unit, trigger_unit):
            ignored.add(trigger_unit)
            continue
        events.add(unit)
        triggers.add(trigger_unit)
        arguments.add(prediction.event_type, prediction.sentence_id, prediction.arguments)
    argument_tally = _Tally()
    _tally_text_arguments(argument_tally, gold_arguments, arguments)
    return _TextSettingScores(
        event_mention=_score_units(gold_events, events),
        trigger=_score_units(gold_triggers, triggers),
        argument_role=argument_tally.score(),
        ignored=len(ignored),
    )


def _score_image_setting(
    predictions: Iterable[ImageEventPrediction],
    gold_events: set[Unit],
    gold_boxes: BoxGold,
    keep: Callable[[Unit], bool],
    threshold: float,
) -> tuple[Score, Score, int]:
    events: set[Unit] = set()
    ignored: set[Unit] = set()
    boxes: dict[Unit, set[BoxCoordinates]] = defaultdict(set)
    for prediction in predictions:
        unit = (prediction.event_type, prediction.image_id)
        if not keep(unit):
            ignored.add(unit)
            continue
        events.add(unit)
        for argument in prediction.arguments:
            boxes[(*unit, argument.role)].add(argument.box)
    argument_tally = _Tally()
    _tally_boxes(argument_tally, gold_boxes, boxes, threshold)
    return _score_units(gold_events, events), argument_tally.score(), len(ignored)


def _score_multimedia(
    predictions: Iterable[MultimediaEventPrediction], index: _GoldIndex, threshold: float
) -> tuple[Score, Score]:
    triples: set[Unit] = set()
    text_arguments = _PredictedTextArguments()
    boxes: dict[Unit, set[BoxCoordinates]] = defaultdict(set)
    for prediction in predictions:
        triples.add((prediction.event_type, prediction.sentence_id, prediction.image_id))
        text_arguments.add(prediction.event_type, prediction.sentence_id, prediction.text_arguments)
        for argument in prediction.image_arguments:
            boxes[(prediction.event_type, prediction.image_id, argument.role)].add(argument.box)
    # Text and image arguments pool into one per-type tally (a sentence id and an image id can be the same string,
    # but the two kinds of group are matched separately and only their counts are added).
    tally = _Tally()
    _tally_text_arguments(tally, index.multimedia_text_arguments, text_arguments)
    _tally_boxes(tally, index.multimedia_boxes, boxes, threshold)
    return _score_units(index.triples, triples), tally.score()


def score_m2e2(gold: M2E2Gold, predictions: Predictions, *, iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> M2E2Scores:
    """Score ``predictions`` against ``gold`` by the rules in :data:`RULES`.

    ``gold`` needs only ``sentences`` (with events tagged ``text_only`` / ``multimedia``), ``images`` (events tagged
    ``image_only`` / ``multimedia``) and ``coref``, as :func:`rmpl_ds.sources.m2e2.load_m2e2` returns them.
    Pure: the result depends on the sets of prediction units only, not on order or repetition.

    Raises:
        ValueError: ``iou_threshold`` outside (0, 1] (at 0, boxes that do not overlap would match).
    """
    if not (0.0 < iou_threshold <= 1.0) or math.isnan(iou_threshold):
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    index = _GoldIndex.build(gold)
    text_only_events = index.text_events[TEXT_ONLY]
    multimedia_text_events = index.text_events[MULTIMEDIA]
    image_only_events = index.image_events[IMAGE_ONLY]

    def keep_text_only(unit: Unit, trigger_unit: Unit) -> bool:
        # The trigger tells which gold event a line stands for: (sentence, type) alone cannot, because a sentence
        # can hold a text-only and a multimedia event of the same type, and the multimedia one's trigger and
        # arguments would then count as wrong text-only predictions (a gold-equal prediction scored below 100).
        if trigger_unit in index.triggers[TEXT_ONLY]:
            return True
        if trigger_unit in index.triggers[MULTIMEDIA]:
            return False
        if unit in text_only_events:
            return True
        return unit[1] in index.text_only_sentences and unit not in multimedia_text_events

    def keep_image_only(unit: Unit) -> bool:
        return unit in image_only_events or unit[1] not in index.multimedia_images

    text_only = _score_text_setting(
        predictions.text,
        text_only_events,
        index.triggers[TEXT_ONLY],
        index.text_arguments[TEXT_ONLY],
        keep_text_only,
    )
    union_text = _score_text_setting(
        predictions.text,
        text_only_events | multimedia_text_events,
        index.triggers[TEXT_ONLY] | index.triggers[MULTIMEDIA],
        index.text_arguments["all"],
        lambda unit, _: unit[1] in index.all_sentences,
    )
    image_only_em, image_only_ar, image_only_ignored = _score_image_setting(
        predictions.image, image_only_events, index.boxes[IMAGE_ONLY], keep_image_only, iou_threshold
    )
    union_image_em, union_image_ar, _ = _score_image_setting(
        predictions.image,
        image_only_events | index.image_events[MULTIMEDIA],
        index.boxes["all"],
        lambda unit: True,
        iou_threshold,
    )
    multimedia_em, multimedia_ar = _score_multimedia(predictions.multimedia, index, iou_threshold)
    return M2E2Scores(
        event_mention={TEXT_ONLY: text_only.event_mention, IMAGE_ONLY: image_only_em, MULTIMEDIA: multimedia_em},
        argument_role={TEXT_ONLY: text_only.argument_role, IMAGE_ONLY: image_only_ar, MULTIMEDIA: multimedia_ar},
        union_event_mention={"text": union_text.event_mention, "image": union_image_em},
        union_argument_role={"text": union_text.argument_role, "image": union_image_ar},
        trigger={TEXT_ONLY: text_only.trigger, "union_text": union_text.trigger},
        gold_counts=gold_counts(gold),
        prediction_counts={
            "text_events": len(predictions.text),
            "image_events": len(predictions.image),
            "multimedia_events": len(predictions.multimedia),
            "skipped_lines": len(predictions.skipped),
            "ignored_units": {
                TEXT_ONLY: text_only.ignored,
                IMAGE_ONLY: image_only_ignored,
                "union_text": union_text.ignored,
            },
        },
        iou_threshold=iou_threshold,
    )


def gold_as_predictions(gold: M2E2Gold) -> Predictions:
    """The gold written as predictions: one text line per text event (with trigger and span arguments), one image
    line per image event, one multimedia line per coreference triple (with the arguments the rules give it).

    Scores 100 in every setting (the golden test of the scorer and a check of a prediction writer).
    """
    text = tuple(
        TextEventPrediction(
            sentence.id,
            event.event_type,
            (event.trigger.start, event.trigger.end),
            tuple(TextArgumentPrediction(a.role, span=(a.start, a.end)) for a in event.arguments),
        )
        for sentence in gold.sentences
        for event in sentence.events
    )
    image = tuple(
        ImageEventPrediction(
            record.id,
            event.event_type,
            tuple(BoxArgumentPrediction(a.role, tuple(a.box)) for a in event.arguments if a.box is not None),
        )
        for record in gold.images
        for event in record.events
    )
    sentences = {sentence.id: sentence for sentence in gold.sentences}
    images = {record.id: record for record in gold.images}
    multimedia = []
    for link in gold.coref:
        sentence = sentences.get(link.sentence_id)
        record = images.get(link.image_id)
        text_arguments = tuple(
            TextArgumentPrediction(a.role, span=(a.start, a.end))
            for event in (sentence.events if sentence else ())
            if event.setting == MULTIMEDIA and event.event_type == link.event_type
            for a in event.arguments
        )
        image_arguments = tuple(
            BoxArgumentPrediction(a.role, tuple(a.box))
            for event in (record.events if record else ())
            if event.setting == MULTIMEDIA and event.event_type == link.event_type
            for a in event.arguments
            if a.box is not None
        )
        multimedia.append(
            MultimediaEventPrediction(link.sentence_id, link.image_id, link.event_type, text_arguments, image_arguments)
        )
    return Predictions(text=text, image=image, multimedia=tuple(multimedia))


# --- prediction lines -------------------------------------------------------------------------------------------

_TEXT_KEYS = {"sentence_id", "event_type", "trigger", "arguments"}
_IMAGE_KEYS = {"image_id", "event_type", "arguments"}
_MULTIMEDIA_KEYS = {"sentence_id", "image_id", "event_type", "trigger", "arguments"}


def parse_prediction(obj: Any) -> EventPrediction:
    """One decoded prediction line -> a predicted event; its kind follows from ``sentence_id`` / ``image_id``.

    Raises:
        ValueError: the line does not follow the format in :data:`RULES` (the message says what was expected
            and what was found; the caller adds the file and line).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {_describe(obj)}")
    has_sentence, has_image = "sentence_id" in obj, "image_id" in obj
    if not has_sentence and not has_image:
        raise ValueError("expected a sentence_id, an image_id or both")
    allowed = _MULTIMEDIA_KEYS if has_sentence and has_image else _TEXT_KEYS if has_sentence else _IMAGE_KEYS
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"unexpected key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    event_type = obj.get("event_type")
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event_type must be one of the 8 M2E2 types ({', '.join(EVENT_TYPES)}), found {event_type!r}")
    raw_arguments = obj.get("arguments", [])
    if not isinstance(raw_arguments, list):
        raise ValueError(f"arguments: expected a list, found {_describe(raw_arguments)}")
    arguments = [_parse_argument(item, f"arguments[{number}]") for number, item in enumerate(raw_arguments)]
    text_arguments = tuple(a for a in arguments if isinstance(a, TextArgumentPrediction))
    image_arguments = tuple(a for a in arguments if isinstance(a, BoxArgumentPrediction))
    if not has_sentence:
        if text_arguments:
            raise ValueError("an image event (image_id without sentence_id) cannot have span or text arguments")
        return ImageEventPrediction(_image_id(obj["image_id"]), event_type, image_arguments)
    sentence_id = _identifier(obj["sentence_id"], "sentence_id")
    trigger = _span(obj["trigger"], "trigger") if obj.get("trigger") is not None else None
    if has_image:
        return MultimediaEventPrediction(
            sentence_id, _image_id(obj["image_id"]), event_type, text_arguments, image_arguments
        )
    if image_arguments:
        raise ValueError("a text event (sentence_id without image_id) cannot have box arguments")
    return TextEventPrediction(sentence_id, event_type, trigger, text_arguments)


def _parse_argument(item: Any, path: str) -> TextArgumentPrediction | BoxArgumentPrediction:
    if not isinstance(item, dict):
        raise ValueError(f"{path}: expected an object, found {_describe(item)}")
    unknown = sorted(set(item) - {"role", "span", "text", "box"})
    if unknown:
        raise ValueError(f"{path}: unexpected key(s) {', '.join(map(repr, unknown))}; allowed: box, role, span, text")
    role = item.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{path}.role: expected a non-empty string, found {role!r}")
    if "box" in item:
        if "span" in item or "text" in item:
            raise ValueError(f"{path}: a box argument cannot also have a span or a text")
        return BoxArgumentPrediction(role, _box(item["box"], f"{path}.box"))
    if "span" in item:
        # A text next to the span is a convenience for readers; the span is what is scored.
        return TextArgumentPrediction(role, span=_span(item["span"], f"{path}.span"))
    if "text" in item:
        text = item["text"]
        if not isinstance(text, str):
            raise ValueError(f"{path}.text: expected a string, found {_describe(text)}")
        return TextArgumentPrediction(role, text=text)
    raise ValueError(f"{path}: expected one of span, text or box")


def _identifier(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: expected a non-empty string, found {value!r}")
    return value.strip()


def _image_id(value: Any) -> str:
    # The coreference file names images as files; accept that spelling too.
    return _identifier(value, "image_id").removesuffix(IMAGE_SUFFIX)


def _span(value: Any, path: str) -> Span:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ValueError(f"{path}: expected [start, end] token offsets with 0 <= start < end, found {value!r}")
    return (value[0], value[1])


def _box(value: Any, path: str) -> BoxCoordinates:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        or value[2] < value[0]
        or value[3] < value[1]
    ):
        raise ValueError(f"{path}: expected [x1, y1, x2, y2] finite numbers with x1 <= x2, y1 <= y2, found {value!r}")
    x1, y1, x2, y2 = value
    return (x1, y1, x2, y2)


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, bytes) else repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def read_predictions(path: str | Path, *, skip_bad_lines: bool = False) -> Predictions:
    """Read a JSON Lines prediction file (``/dev/null`` is an empty one).

    Raises:
        UserError: the file cannot be read, or a line is malformed (``FILE:LINE: what was expected, what was
            found``) unless ``skip_bad_lines``, which records it in :attr:`Predictions.skipped` instead.
    """
    path = Path(path)
    events: list[EventPrediction] = []
    skipped: list[str] = []
    try:
        handle = path.open("rb")
    except OSError as error:
        raise UserError(f"{path}: cannot read the predictions: {error.strerror or error}") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                events.append(parse_prediction(json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
                reason = f"{path}:{line_number}: {_reason(error)}"
                if not skip_bad_lines:
                    raise UserError(f"{reason} (use --skip-bad-lines to skip such lines)") from None
                skipped.append(reason)
    return Predictions.of(events, skipped)


def _reason(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(error, json.JSONDecodeError):
        return f"not a JSON object ({error.msg} at column {error.colno})"
    return str(error)


def prediction_to_json(prediction: EventPrediction) -> dict[str, Any]:
    """A predicted event as one prediction line's object (the inverse of :func:`parse_prediction`)."""

    def text_argument(argument: TextArgumentPrediction) -> dict[str, Any]:
        if argument.span is not None:
            return {"role": argument.role, "span": list(argument.span)}
        return {"role": argument.role, "text": argument.text}

    def box_argument(argument: BoxArgumentPrediction) -> dict[str, Any]:
        return {"role": argument.role, "box": list(argument.box)}

    if isinstance(prediction, TextEventPrediction):
        line: dict[str, Any] = {"sentence_id": prediction.sentence_id, "event_type": prediction.event_type}
        if prediction.trigger is not None:
            line["trigger"] = list(prediction.trigger)
        line["arguments"] = [text_argument(a) for a in prediction.arguments]
        return line
    if isinstance(prediction, ImageEventPrediction):
        return {
            "image_id": prediction.image_id,
            "event_type": prediction.event_type,
            "arguments": [box_argument(a) for a in prediction.arguments],
        }
    return {
        "sentence_id": prediction.sentence_id,
        "image_id": prediction.image_id,
        "event_type": prediction.event_type,
        "arguments": [text_argument(a) for a in prediction.text_arguments]
        + [box_argument(a) for a in prediction.image_arguments],
    }


def write_predictions(path: str | Path, predictions: Predictions | Iterable[EventPrediction]) -> Path:
    """Write predicted events as JSON Lines (text, then image, then multimedia lines); returns the path.

    Written to a temporary name and renamed, so a half-written file never looks complete.
    """
    events = predictions.events() if isinstance(predictions, Predictions) else predictions
    lines = (json.dumps(prediction_to_json(event), ensure_ascii=False) + "\n" for event in events)
    return atomic.write_text(path, "".join(lines))
