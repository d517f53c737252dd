"""A small, learnable synthetic dataset in every real raw format, so the whole pipeline runs without licensed data.

:func:`write_demo` writes, under one directory::

    ace/{train,dev,test}.json                         ACE 2005 in nlpcl-lab format
    swig/SWiG_jsons/{train,dev,test,imsitu_space}.json  SWiG (imSitu + boxes), images in swig/images_512/
    imsitu/{train,dev,test,imsitu_space}.json          the same situations as plain imSitu (no boxes)
    mnre/mnre_txt/{mnre_train.txt,"mnre_val .txt",mnre_test.txt}   dict-literal lines, images in mnre/img_org/<split>/
    m2e2/m2e2_annotations/<the five files>             the evaluation set, images in m2e2/image/
    chat/{llava_train.json,sharegpt_train.json,openai_train.jsonl}   conversations about demo scenes in three chat
                                                       layouts (rmpl_ds.sources.chat), images in chat/images/
    pairs/metadata.jsonl                               unlabeled image-caption pairs in the Hugging Face ImageFolder
                                                       captions layout (rmpl_ds.sources.pairs), images beside it
    demo_summary.json                                  what was written (the counts the converters must find)

so that ``rmpl-ds shards build`` reads it exactly like the real data (the commands are in the summary).

What makes it learnable (the same cues in training and evaluation data):

* Text: every event sentence is a template of its type with a trigger word used by that type only
  (:data:`TRIGGERS`), and its arguments fill fixed slots with role-typed phrases. Negatives have no trigger word.
  The ACE training text and the M2E2 evaluation text share the vocabulary.
* Images: a plain background, one large shape whose shape *and* colour encode the event type
  (:data:`TYPE_GLYPHS`), and a small glyph per argument whose shape and colour encode the role
  (:data:`ROLE_GLYPHS`); the argument's box is the glyph's box. Negatives show only grey distractors. SWiG
  training images and M2E2 evaluation images share the code.
* Pairs (X-MTL's pseudo-label input; VOA's captions are not public): a caption written like the text cues and an
  image drawn like the image cues, so a trained model can tell whether they show the same event. About half agree
  (the caption's type is the image's), a fifth disagree (another type in the image), the rest have an event on one
  side only or on neither (:data:`PAIR_KINDS`; the summary counts them).

Everything is a pure function of ``(seed, size)``: the same call writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from rmpl_ds import atomic
from rmpl_ds.errors import UserError
from rmpl_ds.ontology import EVENT_TYPES, IMAGE_ROLES, RELATION_LABELS, ROLES, imsitu_verb_mappings

SUMMARY_NAME = "demo_summary.json"
DEFAULT_SIZE = 300
MIN_SIZE = 10
# Fixed JPEG settings: the demo files must be byte-identical for a seed.
JPEG_QUALITY = 92

# --- text cues -------------------------------------------------------------------------------------------------

# Trigger words, disjoint across types; no filler phrase or negative template uses any of them.
TRIGGERS: dict[str, tuple[str, ...]] = {
    "Conflict:Attack": ("attacked", "bombed", "shelled", "raided"),
    "Conflict:Demonstrate": ("protested", "rallied", "demonstrated", "marched"),
    "Contact:Meet": ("met", "visited", "hosted", "welcomed"),
    "Contact:Phone-Write": ("phoned", "emailed", "texted", "telephoned"),
    "Justice:Arrest-Jail": ("arrested", "detained", "jailed", "handcuffed"),
    "Life:Die": ("died", "perished", "drowned", "succumbed"),
    "Movement:Transport": ("drove", "shipped", "flew", "ferried"),
    "Transaction:Transfer-Money": ("paid", "donated", "lent", "wired"),
}

# ACE types M2E2 does not use (the ACE converter drops these mentions, so the sentence becomes a negative).
OTHER_ACE_TRIGGERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Personnel:End-Position": ("resigned", ("{Person}", "{T}", "from", "{Entity}", ".")),
    "Life:Marry": ("married", ("{Person}", "{T}", "{Person}", "in", "{Place}", ".")),
    "Business:Start-Org": ("founded", ("{Agent}", "{T}", "{Org}", "in", "{Place}", ".")),
    "Justice:Sue": ("sued", ("{Plaintiff}", "{T}", "{Defendant}", ".")),
}

# Token templates per type: "{T}" is the trigger, "{Role}" an argument slot (a role may fill two slots).
TEMPLATES: dict[str, tuple[tuple[str, ...], ...]] = {
    "Conflict:Attack": (
        ("{Attacker}", "{T}", "{Target}", "with", "{Instrument}", "in", "{Place}", "."),
        ("In", "{Place}", ",", "{Attacker}", "{T}", "{Target}", "."),
        ("{Attacker}", "{T}", "{Target}", "."),
    ),
    "Conflict:Demonstrate": (
        ("{Entity}", "{T}", "in", "{Place}", "as", "{Police}", "watched", "."),
        ("{Entity}", "{T}", "outside", "{Place}", "."),
    ),
    "Contact:Meet": (
        ("{Entity}", "{T}", "{Entity}", "in", "{Place}", "."),
        ("{Entity}", "and", "{Entity}", "{T}", "at", "{Place}", "."),
    ),
    "Contact:Phone-Write": (
        ("{Entity}", "{T}", "{Entity}", "from", "{Place}", "."),
        ("{Entity}", "{T}", "{Entity}", "."),
    ),
    "Justice:Arrest-Jail": (
        ("{Agent}", "{T}", "{Person}", "in", "{Place}", "."),
        ("{Person}", "was", "{T}", "by", "{Agent}", "."),
    ),
    "Life:Die": (
        ("{Victim}", "{T}", "in", "{Place}", "."),
        ("{Victim}", "{T}", "after", "{Agent}", "opened", "fire", "with", "{Instrument}", "."),
    ),
    "Movement:Transport": (
        ("{Agent}", "{T}", "{Artifact}", "from", "{Origin}", "to", "{Destination}", "in", "{Vehicle}", "."),
        ("{Agent}", "{T}", "{Artifact}", "to", "{Destination}", "."),
    ),
    "Transaction:Transfer-Money": (
        ("{Giver}", "{T}", "500", "dollars", "to", "{Recipient}", "."),
        ("{Giver}", "{T}", "{Recipient}", "a", "large", "sum", "."),
    ),
}

NEGATIVE_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("Officials", "in", "{Place}", "reviewed", "the", "budget", "on", "Monday", "."),
    ("The", "weather", "in", "{Place}", "was", "cold", "and", "windy", "."),
    ("{Entity}", "said", "the", "report", "would", "be", "published", "soon", "."),
    ("Prices", "in", "{Place}", "rose", "slightly", "this", "year", "."),
)

_PEOPLE = (
    ("the president", "PER:Individual"),
    ("Maria Lopez", "PER:Individual"),
    ("the minister", "PER:Individual"),
    ("John Smith", "PER:Individual"),
    ("the ambassador", "PER:Individual"),
    ("Ahmed Khan", "PER:Individual"),
)
_PLACES = (
    ("Aleppo", "GPE:Population-Center"),
    ("the capital", "GPE:Population-Center"),
    ("Lagos", "GPE:Population-Center"),
    ("the border town", "GPE:Population-Center"),
    ("Chicago", "GPE:Population-Center"),
    ("the city square", "FAC:Building-Grounds"),
)
# Role -> filler phrases with their ACE entity type.
FILLERS: dict[str, tuple[tuple[str, str], ...]] = {
    "Attacker": (("the rebels", "ORG:Non-Governmental"), ("two gunmen", "PER:Group"), ("the army", "ORG:Government")),
    "Target": (("the convoy", "VEH:Land"), ("a market", "FAC:Building-Grounds"), ("the villagers", "PER:Group")),
    "Instrument": (("rockets", "WEA:Projectile"), ("a rifle", "WEA:Shooting"), ("grenades", "WEA:Exploding")),
    "Place": _PLACES,
    "Origin": _PLACES,
    "Destination": _PLACES,
    "Entity": (
        *_PEOPLE,
        ("thousands of students", "PER:Group"),
        ("the workers", "PER:Group"),
    ),
    "Police": (("riot police", "PER:Group"), ("the officers", "PER:Group")),
    "Agent": (
        ("the police", "ORG:Government"),
        ("federal agents", "PER:Group"),
        ("the aid agency", "ORG:Non-Governmental"),
    ),
    "Person": (("a suspect", "PER:Individual"), ("the driver", "PER:Individual"), *_PEOPLE[:3]),
    "Victim": (("a journalist", "PER:Individual"), ("three civilians", "PER:Group"), ("the soldier", "PER:Individual")),
    "Artifact": (("the refugees", "PER:Group"), ("the wounded", "PER:Group"), ("the children", "PER:Group")),
    "Vehicle": (("a truck", "VEH:Land"), ("a boat", "VEH:Water"), ("a plane", "VEH:Air")),
    "Giver": (*_PEOPLE[:4], ("the bank", "ORG:Commercial")),
    "Recipient": (("the charity", "ORG:Non-Governmental"), *_PEOPLE[2:]),
    "Org": (("a company", "ORG:Commercial"), ("a newspaper", "ORG:Media")),
    "Plaintiff": _PEOPLE,
    "Defendant": (("the company", "ORG:Commercial"), ("the city", "GPE:Population-Center")),
}
_TIMES = (("on Monday", "TIM:time"), ("last week", "TIM:time"), ("on Friday", "TIM:time"))

# --- image cues -----------------------------------------------------------------------------------------------

# Event type -> (shape, RGB) of the large shape. Colours are far (> 60 per channel somewhere) from each other,
# from the role colours and from the backgrounds, so they survive JPEG.
TYPE_GLYPHS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "Conflict:Attack": ("triangle", (220, 30, 30)),
    "Conflict:Demonstrate": ("star", (245, 140, 20)),
    "Contact:Meet": ("circle", (30, 170, 60)),
    "Contact:Phone-Write": ("square", (30, 80, 230)),
    "Justice:Arrest-Jail": ("diamond", (140, 40, 200)),
    "Life:Die": ("cross", (235, 80, 170)),
    "Movement:Transport": ("hexagon", (20, 190, 200)),
    "Transaction:Transfer-Money": ("pentagon", (235, 215, 20)),
}
_ROLE_SHAPES = ("circle", "square", "triangle", "diamond")
_ROLE_COLOURS = ((250, 250, 250), (15, 15, 15), (115, 60, 15), (90, 100, 40))
# Role -> (shape, RGB) of its small glyph: 4 shapes x 4 colours give the 16 roles distinct glyphs.
ROLE_GLYPHS: dict[str, tuple[str, tuple[int, int, int]]] = {
    role: (_ROLE_SHAPES[number % 4], _ROLE_COLOURS[number // 4]) for number, role in enumerate(ROLES)
}
_BACKGROUNDS = ((205, 200, 190), (190, 198, 205), (200, 205, 195), (210, 200, 205))
_DISTRACTOR = (150, 150, 150)

# --- imSitu/SWiG cues -----------------------------------------------------------------------------------------

# Event type -> imSitu verbs of M2E2's ace_sr_mapping.txt used for it (the converter maps them back).
DEMO_VERBS: dict[str, tuple[str, ...]] = {
    "Conflict:Attack": ("attacking", "shooting"),
    "Conflict:Demonstrate": ("protesting", "parading"),
    "Contact:Meet": ("talking", "discussing"),
    "Contact:Phone-Write": ("phoning", "telephoning"),
    "Justice:Arrest-Jail": ("arresting", "handcuffing"),
    "Life:Die": ("burying", "crashing"),
    "Movement:Transport": ("carrying", "loading"),
    "Transaction:Transfer-Money": ("paying", "buying"),
}
# Verbs without an M2E2 meaning (negatives) and their roles.
NEGATIVE_VERBS: dict[str, tuple[str, ...]] = {
    "hitchhiking": ("agent", "place"),
    "skiing": ("agent", "place"),
    "standing": ("agent", "place"),
    "reading": ("agent", "item", "place"),
}
# M2E2 role -> the noun glosses drawn for it; the noun ids are made up (n9xxxxxxx), glosses are real words.
ROLE_NOUNS: dict[str, tuple[str, ...]] = {
    "Attacker": ("soldier", "man"),
    "Target": ("building", "car"),
    "Instrument": ("rifle", "stone", "telephone", "sign"),
    "Entity": ("man", "woman", "protester", "crowd"),
    "Police": ("police officer",),
    "Place": ("street", "field", "room"),
    "Agent": ("police officer", "man", "woman"),
    "Person": ("man", "woman"),
    "Victim": ("man", "corpse"),
    "Artifact": ("box", "child"),
    "Vehicle": ("truck", "boat", "car"),
    "Giver": ("man",),
    "Recipient": ("woman", "shopkeeper"),
    "Money": ("money", "coin"),
    "Origin": ("city",),
    "Destination": ("city",),
}
_OTHER_NOUNS = ("road", "book", "hill", "snow", "table")

# --- MNRE cues ------------------------------------------------------------------------------------------------

_MNRE_NAMES: dict[str, tuple[str, ...]] = {
    "per": ("Rafael Nadal", "Mery Perello", "Taylor Swift", "Joe Biden", "Serena Williams", "Lionel Messi"),
    "org": ("Real Madrid", "NASA", "Google", "the UN", "Chelsea FC"),
    "loc": ("Paris", "Texas", "Tokyo", "South Wales", "Hell 's Kitchen"),
    "misc": ("the Oscars", "Wimbledon", "Christmas", "Islam", "American", "the Nobel Prize"),
}
# Relation -> the words between head and tail (head first); None has its own neutral phrase.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "None": ("and",),
    "/per/per/parent": ("is", "the", "father", "of"),
    "/per/per/siblings": ("is", "the", "brother", "of"),
    "/per/per/couple": ("gets", "engaged", "to"),
    "/per/per/neighbor": ("lives", "next", "door", "to"),
    "/per/per/peer": ("plays", "doubles", "with"),
    "/per/per/charges": ("files", "charges", "against"),
    "/per/per/alumi": ("went", "to", "school", "with"),
    "/per/per/alternate_names": ("also", "known", "as"),
    "/per/org/member_of": ("signs", "for"),
    "/per/loc/place_of_residence": ("lives", "in"),
    "/per/loc/place_of_birth": ("was", "born", "in"),
    "/org/org/alternate_names": ("also", "called"),
    "/org/org/subsidiary": ("is", "a", "branch", "of"),
    "/org/loc/locate_at": ("is", "headquartered", "in"),
    "/loc/loc/contain": ("includes",),
    "/per/misc/present_in": ("appears", "at"),
    "/per/misc/awarded": ("wins",),
    "/per/misc/race": ("is", "proudly"),
    "/per/misc/religion": ("converts", "to"),
    "/per/misc/nationality": ("is", "a", "citizen", "who", "is"),
    "/misc/misc/part_of": ("is", "part", "of"),
    "/misc/loc/held_on": ("takes", "place", "in"),
}


@dataclass
class DemoSummary:
    """What :func:`write_demo` wrote: paths, per-source ground-truth counts, and the shard build commands."""

    out_dir: str
    seed: int
    size: int
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)
    build_commands: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The summary file's content: no paths, so it is identical wherever the demo is written."""
        return {"seed": self.seed, "size": self.size, "counts": self.counts}


def write_demo(out_dir: str | Path, *, seed: int = 0, size: int = DEFAULT_SIZE) -> DemoSummary:
    """Write the demo dataset to ``out_dir`` (see the module docstring) and return its summary.

    ``size`` is roughly the number of records per source (ACE sentences, SWiG images, MNRE lines, M2E2
    sentences). The directory is built under a temporary name and renamed when complete; an existing ``out_dir``
    is replaced only if it is a previous demo (holds ``demo_summary.json``).

    Raises:
        UserError: ``size`` below the minimum, or ``out_dir`` exists and is not a demo directory.
    """
    if size < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE}, got {size}")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SUMMARY_NAME).is_file())):
        raise UserError(f"{out}: exists and is not a demo directory (no {SUMMARY_NAME}); refusing to replace it")
    with atomic.directory(out, replace=True) as staging:
        summary = DemoSummary(str(out), seed, size)
        summary.counts["ace"] = _write_ace(staging / "ace", random.Random(f"{seed}:ace"), size)
        summary.counts["swig"] = _write_swig(staging, random.Random(f"{seed}:swig"), size)
        summary.counts["mnre"] = _write_mnre(staging / "mnre", random.Random(f"{seed}:mnre"), size)
        summary.counts["m2e2"] = _write_m2e2(staging / "m2e2", random.Random(f"{seed}:m2e2"), size)
        summary.counts["chat"] = _write_chat(staging / "chat", random.Random(f"{seed}:chat"), size)
        summary.counts["pairs"] = _write_pairs(staging / "pairs", random.Random(f"{seed}:pairs"), size)
        summary.build_commands = build_commands(out)
        _write_json(staging / SUMMARY_NAME, summary.to_json(), indent=2)
    return summary


def build_commands(out: Path, shards_dir: str = "shards/demo") -> dict[str, str]:
    """The ``rmpl-ds shards build`` command line for each demo source."""
    return {
        "ace": f"rmpl-ds shards build --source ace --input {out}/ace --out {shards_dir}/ace",
        "swig": (
            f"rmpl-ds shards build --source swig --input {out}/swig/SWiG_jsons --images {out}/swig/images_512 "
            f"--out {shards_dir}/swig"
        ),
        "imsitu": (
            f"rmpl-ds shards build --source imsitu --input {out}/imsitu --images {out}/swig/images_512 "
            f"--out {shards_dir}/imsitu"
        ),
        "mnre": (
            f"rmpl-ds shards build --source mnre --input {out}/mnre/mnre_txt --images {out}/mnre/img_org "
            f"--out {shards_dir}/mnre"
        ),
        "m2e2": (
            f"rmpl-ds shards build --source m2e2 --input {out}/m2e2/m2e2_annotations --images {out}/m2e2/image "
            f"--out {shards_dir}/m2e2"
        ),
        "chat": f"rmpl-ds shards build --source chat --input {out}/chat --out {shards_dir}/chat",
        "pairs": f"rmpl-ds shards build --source pairs --input {out}/pairs --out {shards_dir}/pairs",
    }


# --- helpers --------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, ensure_ascii=True) if indent else json.dumps(obj, separators=(",", ":"))
    path.write_text(text, encoding="utf-8")


def _split_of(number: int, total: int, names: Sequence[str] = ("train", "dev", "test")) -> str:
    """70 / 15 / 15 by position, so every split is non-empty for total >= 10."""
    if number < round(total * 0.7):
        return names[0]
    if number < round(total * 0.85):
        return names[1]
    return names[2]


@dataclass
class _Sentence:
    tokens: list[str]
    # (ACE or M2E2 type, trigger (start, end), [(role, start, end, text, entity type)])
    events: list[tuple[str, tuple[int, int], list[tuple[str, int, int, str, str]]]]
    entities: list[tuple[int, int, str, str]]


def _fill(rng: random.Random, template: Sequence[str], trigger: str, event_type: str | None) -> _Sentence:
    """Instantiate a template: slots get role-typed phrases (distinct within the sentence)."""
    tokens: list[str] = []
    arguments: list[tuple[str, int, int, str, str]] = []
    entities: list[tuple[int, int, str, str]] = []
    used: set[str] = set()
    trigger_span = (0, 0)
    for slot in template:
        if slot == "{T}":
            trigger_span = (len(tokens), len(tokens) + 1)
            tokens.append(trigger)
        elif slot.startswith("{"):
            role = slot[1:-1]
            choices = [filler for filler in FILLERS[role] if filler[0] not in used] or list(FILLERS[role])
            text, entity_type = rng.choice(choices)
            used.add(text)
            words = text.split()
            start = len(tokens)
            tokens.extend(words)
            arguments.append((role, start, len(tokens), text, entity_type))
            entities.append((start, len(tokens), text, entity_type))
        else:
            tokens.append(slot)
    events = [(event_type, trigger_span, arguments)] if event_type else []
    return _Sentence(tokens, events, entities)


def _event_sentence(rng: random.Random, event_type: str) -> _Sentence:
    return _fill(rng, rng.choice(TEMPLATES[event_type]), rng.choice(TRIGGERS[event_type]), event_type)


def _negative_sentence(rng: random.Random) -> _Sentence:
    return _fill(rng, rng.choice(NEGATIVE_TEMPLATES), "", None)


def _with_time(rng: random.Random, sentence: _Sentence) -> _Sentence:
    """Append a time expression as a ``Time-Within`` argument (ACE has them; M2E2's schema drops them)."""
    text, entity_type = rng.choice(_TIMES)
    words = text.split()
    start = len(sentence.tokens) - 1  # before the final "."
    tokens = sentence.tokens[:-1] + words + sentence.tokens[-1:]
    end = start + len(words)
    event_type, trigger, arguments = sentence.events[0]
    events = [(event_type, trigger, [*arguments, ("Time-Within", start, end, text, entity_type)])]
    return _Sentence(tokens, events, [*sentence.entities, (start, end, text, entity_type)])


# --- ACE ------------------------------------------------------------------------------------------------------


def _ace_item(sentence: _Sentence, number: int) -> dict[str, Any]:
    """One sentence in nlpcl-lab's key order, with placeholder parses (the converter ignores them)."""
    mentions = [
        {
            "text": text,
            "entity-type": entity_type,
            "head": {"text": text.split()[-1], "start": end - 1, "end": end},
            "entity_id": f"DEMO_{number:05d}-E{position}-{position}",
            "start": start,
            "end": end,
        }
        for position, (start, end, text, entity_type) in enumerate(sentence.entities)
    ]
    events = [
        {
            "trigger": {"text": " ".join(sentence.tokens[start:end]), "start": start, "end": end},
            "arguments": [
                {"role": role, "entity-type": entity_type, "text": text, "start": arg_start, "end": arg_end}
                for role, arg_start, arg_end, text, entity_type in arguments
            ],
            "event_type": event_type,
        }
        for event_type, (start, end), arguments in sentence.events
    ]
    n = len(sentence.tokens)
    return {
        "sentence": " ".join(sentence.tokens),
        "golden-entity-mentions": mentions,
        "golden-event-mentions": events,
        "stanford-colcc": ["ROOT/dep=0/gov=-1", *(f"dep/dep={i}/gov=0" for i in range(1, n))],
        "words": sentence.tokens,
        "pos-tags": ["NN"] * n,
        "lemma": [token.lower() for token in sentence.tokens],
        "parse": "(ROOT (S " + " ".join(f"(NN {token})" for token in sentence.tokens) + "))",
    }


def _write_ace(directory: Path, rng: random.Random, size: int) -> dict[str, Any]:
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "dev": [], "test": []}
    m2e2_events: Counter[str] = Counter()
    other_events: Counter[str] = Counter()
    negatives = 0
    for number in range(size):
        draw = rng.random()
        if draw < 0.8:
            event_type = EVENT_TYPES[number % len(EVENT_TYPES)]
            sentence = _event_sentence(rng, event_type)
            if rng.random() < 0.3:
                sentence = _with_time(rng, sentence)
            m2e2_events[event_type] += 1
        elif draw < 0.9:
            ace_type = sorted(OTHER_ACE_TRIGGERS)[number % len(OTHER_ACE_TRIGGERS)]
            trigger, template = OTHER_ACE_TRIGGERS[ace_type]
            sentence = _fill(rng, template, trigger, ace_type)
            other_events[ace_type] += 1
            negatives += 1
        else:
            sentence = _negative_sentence(rng)
            negatives += 1
        splits[_split_of(number, size)].append(_ace_item(sentence, number))
    for split, items in splits.items():
        _write_json(directory / f"{split}.json", items, indent=4)
    return {
        "sentences": size,
        "by_split": {split: len(items) for split, items in sorted(splits.items())},
        "events": sum(m2e2_events.values()),
        "by_event_type": dict(sorted(m2e2_events.items())),
        "dropped_event_types": dict(sorted(other_events.items())),
        "negatives": negatives,
    }


# --- images ---------------------------------------------------------------------------------------------------


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` inscribed in ``box``; None for a circle (drawn as an ellipse)."""
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2

    def regular(count: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [
            (cx + rx * math.cos(start + 2 * math.pi * k / count), cy + ry * math.sin(start + 2 * math.pi * k / count))
            for k in range(count)
        ]

    if shape == "circle":
        return None
    if shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "pentagon":
        return regular(5)
    if shape == "hexagon":
        return regular(6, 0.0)
    if shape == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + math.pi * k / 5
            scale = 1.0 if k % 2 == 0 else 0.45
            points.append((cx + rx * scale * math.cos(angle), cy + ry * scale * math.sin(angle)))
        return points
    if shape == "cross":
        tx, ty = rx / 3, ry / 3
        return [
            (cx - tx, y1), (cx + tx, y1), (cx + tx, cy - ty), (x2, cy - ty), (x2, cy + ty), (cx + tx, cy + ty),
            (cx + tx, y2), (cx - tx, y2), (cx - tx, cy + ty), (x1, cy + ty), (x1, cy - ty), (cx - tx, cy - ty),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: Sequence[int]) -> None:
    points = _polygon(shape, box)
    fill = tuple(colour)
    if points is None:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _free_box(
    rng: random.Random, width: int, height: int, side: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int]:
    """A ``side`` x ``side`` box inside the image overlapping none of ``taken`` (or the last try if crowded)."""
    box = (0, 0, side, side)
    for _ in range(200):
        x1 = rng.randrange(0, max(1, width - side))
        y1 = rng.randrange(0, max(1, height - side))
        box = (x1, y1, x1 + side, y1 + side)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return box


def draw_scene(
    rng: random.Random, width: int, height: int, event_type: str | None, roles: Sequence[str]
) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """An image with the type's large shape (none for a negative) and one role glyph per entry of ``roles``.

    Returns the image and ``(role, box)`` per glyph, boxes ``[x1, y1, x2, y2]`` in pixels (x2, y2 exclusive).
    """
    image = Image.new("RGB", (width, height), rng.choice(_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    taken: list[tuple[int, int, int, int]] = []
    if event_type is not None:
        shape, colour = TYPE_GLYPHS[event_type]
        big = _free_box(rng, width, height, int(short * rng.uniform(0.35, 0.45)), taken)
        _draw_shape(draw, shape, big, colour)
        taken.append(big)
    else:
        for _ in range(rng.randint(1, 2)):
            distractor = _free_box(rng, width, height, int(short * rng.uniform(0.15, 0.3)), taken)
            _draw_shape(draw, rng.choice(_ROLE_SHAPES), distractor, _DISTRACTOR)
            taken.append(distractor)
    boxes = []
    for role in roles:
        box = _free_box(rng, width, height, int(short * rng.uniform(0.10, 0.15)), taken)
        shape, colour = ROLE_GLYPHS[role]
        _draw_shape(draw, shape, box, colour)
        taken.append(box)
        boxes.append((role, box))
    return image, boxes


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    path.write_bytes(buffer.getvalue())


def _image_size(rng: random.Random, short: int, long_max: int) -> tuple[int, int]:
    long = rng.randint(short, long_max)
    return (long, short) if rng.random() < 0.5 else (short, long)


# --- imSitu / SWiG --------------------------------------------------------------------------------------------


def _noun_ids() -> dict[str, str]:
    glosses = sorted({noun for nouns in ROLE_NOUNS.values() for noun in nouns} | set(_OTHER_NOUNS))
    return {gloss: f"n9{number:07d}" for number, gloss in enumerate(glosses)}


def _demo_space() -> dict[str, Any]:
    """An imsitu_space.json with the demo verbs (their real roles from ace_sr_mapping.txt) and demo nouns."""
    mappings = imsitu_verb_mappings()
    verbs: dict[str, Any] = {}
    for verb in sorted([*(v for vs in DEMO_VERBS.values() for v in vs), *NEGATIVE_VERBS]):
        order = list(mappings[verb].roles) if verb in mappings else list(NEGATIVE_VERBS[verb])
        verbs[verb] = {
            "framenet": verb.capitalize(),
            "abstract": " ".join(role.upper() for role in order),
            "def": f"demo verb {verb}",
            "order": order,
            "roles": {role: {"framenet": role, "def": f"the {role}"} for role in order},
        }
    nouns = {noun_id: {"gloss": [gloss], "def": f"a {gloss}"} for gloss, noun_id in _noun_ids().items()}
    return {"verbs": verbs, "nouns": nouns}


def _write_swig(root: Path, rng: random.Random, size: int) -> dict[str, Any]:
    mappings = imsitu_verb_mappings()
    space = _demo_space()
    noun_ids = _noun_ids()
    swig: dict[str, dict[str, Any]] = {"train": {}, "dev": {}, "test": {}}
    events: Counter[str] = Counter()
    boxes = negatives = 0
    for number in range(size):
        split = _split_of(number, size)
        width, height = _image_size(rng, 512, 720)
        if rng.random() < 0.85:
            event_type = EVENT_TYPES[number % len(EVENT_TYPES)]
            verb = rng.choice(DEMO_VERBS[event_type])
            mapping = mappings[verb]
            order = list(mapping.roles)
            # Roles M2E2's image schema keeps get a drawn glyph and a box; the others (e.g. place) a noun only.
            grounded = [role for role in order if mapping.roles[role] in IMAGE_ROLES[event_type]]
            drawn = [role for role in grounded if rng.random() < 0.9]
            image, placed = draw_scene(rng, width, height, event_type, [mapping.roles[role] for role in drawn])
            role_boxes = dict(zip(drawn, (box for _, box in placed), strict=True))
            frame = {role: noun_ids[rng.choice(ROLE_NOUNS.get(mapping.roles[role], _OTHER_NOUNS))] for role in order}
            for role in grounded:
                if role not in drawn:
                    frame[role] = ""  # an empty (∅) role: no noun, no box, so no argument
            events[event_type] += 1
            boxes += len(drawn)
        else:
            verb = rng.choice(sorted(NEGATIVE_VERBS))
            order = list(NEGATIVE_VERBS[verb])
            image, _ = draw_scene(rng, width, height, None, [])
            role_boxes = {}
            frame = {role: noun_ids[rng.choice(_OTHER_NOUNS)] for role in order}
            negatives += 1
        key = f"{verb}_{number}.jpg"
        _save_jpeg(image, root / "swig" / "images_512" / key)
        frames = [dict(frame), dict(frame), dict(frame)]
        filled = [role for role in order if frame[role]]
        if filled and rng.random() < 0.3:  # a dissenting third annotator; the majority noun still wins
            frames[2][rng.choice(filled)] = noun_ids[rng.choice(_OTHER_NOUNS)]
        swig[split][key] = {
            "verb": verb,
            "height": height,
            "width": width,
            "bb": {role: list(role_boxes[role]) if role in role_boxes else [-1, -1, -1, -1] for role in order},
            "frames": frames,
        }
    for split, records in swig.items():
        _write_json(root / "swig" / "SWiG_jsons" / f"{split}.json", records)
        plain = {key: {"frames": value["frames"], "verb": value["verb"]} for key, value in records.items()}
        _write_json(root / "imsitu" / f"{split}.json", plain)
    _write_json(root / "swig" / "SWiG_jsons" / "imsitu_space.json", space)
    _write_json(root / "imsitu" / "imsitu_space.json", space)
    return {
        "images": size,
        "by_split": {split: len(records) for split, records in sorted(swig.items())},
        "events": sum(events.values()),
        "by_event_type": dict(sorted(events.items())),
        "boxes": boxes,
        "negatives": negatives,
    }


# --- MNRE -----------------------------------------------------------------------------------------------------


def _write_mnre(directory: Path, rng: random.Random, size: int) -> dict[str, Any]:
    files = {"train": "mnre_train.txt", "val": "mnre_val .txt", "test": "mnre_test.txt"}
    lines: dict[str, list[str]] = {split: [] for split in files}
    labels: Counter[str] = Counter()
    images = 0
    number = 0
    while number < size:
        split = _split_of(number, size, ("train", "val", "test"))
        img_id = f"twitter_demo_{number:05d}.jpg"
        # One tweet, one image, one or two entity pairs (the real files repeat the sentence per pair).
        pairs = min(rng.choice((1, 1, 2)), size - number)
        relations = [rng.choice(RELATION_LABELS) if rng.random() < 0.7 else "None" for _ in range(pairs)]
        relation = relations[0]
        head_type, tail_type = ("per", "per") if relation == "None" else relation.split("/")[1:3]
        head = rng.choice(_MNRE_NAMES[head_type])
        tail = rng.choice([name for name in _MNRE_NAMES[tail_type] if name != head])
        prefix = ["RT", f"@user{rng.randint(1, 99)}", ":"] if rng.random() < 0.5 else []
        tokens = [*prefix, *head.split(), *RELATION_PHRASES[relation], *tail.split(), "!"]
        h = (len(prefix), len(prefix) + len(head.split()))
        t = (h[1] + len(RELATION_PHRASES[relation]), h[1] + len(RELATION_PHRASES[relation]) + len(tail.split()))
        pair_list = [(h, t, relation)]
        if pairs == 2:
            # The second pair of the same tweet: tail -> head, which the template does not state.
            pair_list.append((t, h, "None"))
        for (hs, he), (ts, te), label in pair_list:
            item = {
                "token": tokens,
                "h": {"name": " ".join(tokens[hs:he]), "pos": [hs, he]},
                "t": {"name": " ".join(tokens[ts:te]), "pos": [ts, te]},
                "img_id": img_id,
                "relation": label,
            }
            lines[split].append(repr(item))  # Python's dict repr, exactly as the real files are written
            labels[label] += 1
            number += 1
        width, height = _image_size(rng, 240, 360)
        image, _ = draw_scene(rng, width, height, None, [])
        _save_jpeg(image, directory / "img_org" / split / img_id)
        images += 1
    for split, name in files.items():
        path = directory / "mnre_txt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines[split]), encoding="utf-8")
    return {
        "lines": sum(len(split_lines) for split_lines in lines.values()),
        "by_split": {split: len(split_lines) for split, split_lines in sorted(lines.items())},
        "by_relation": dict(sorted(labels.items())),
        "images": images,
    }


# --- M2E2 -----------------------------------------------------------------------------------------------------


def _m2e2_sentence_item(
    sentence_id: str, sentence: _Sentence, doc_offset: int, events: list[int], images: list[str]
) -> dict[str, Any]:
    """A text record in M2E2's key order, with its real quirks: document-coordinate inclusive string offsets, and a
    final "." that is in ``words`` but not in ``sentence`` (its index equals ``sentence_end``)."""
    tokens = sentence.tokens
    index = []
    position = doc_offset
    for token in tokens[:-1]:
        index.append([str(position), str(position + len(token) - 1)])
        position += len(token) + 1
    text = " ".join(tokens[:-1])
    sentence_end = doc_offset + len(text)
    index.append([str(sentence_end), str(sentence_end)])
    return {
        "sentence_id": sentence_id,
        "sentence_start": doc_offset,
        "sentence_end": sentence_end,
        "sentence": text,
        "words": tokens,
        "index": index,
        "pos-tags": ["NN"] * len(tokens),
        "combined-parsing": ["dep=0/gov=-1", *(f"dep={i}/gov=0" for i in range(1, len(tokens)))],
        "golden-entity-mentions": [
            {"entity-type": kind.split(":")[0], "text": text, "start": start, "end": end}
            for start, end, text, kind in sentence.entities
        ],
        "golden-event-mentions": [
            {
                "trigger": {
                    "start": sentence.events[k][1][0],
                    "end": sentence.events[k][1][1],
                    "text": " ".join(tokens[sentence.events[k][1][0] : sentence.events[k][1][1]]),
                },
                "event_type": sentence.events[k][0],
                "arguments": [
                    {"role": role, "start": start, "end": end, "text": arg_text}
                    for role, start, end, arg_text, _ in sentence.events[k][2]
                ],
            }
            for k in events
        ],
        "image": images,
    }


def _joined(first: _Sentence, second: _Sentence) -> _Sentence:
    """``first`` (without its ".") + "," "while" + ``second``: one sentence with both events (the overlap case)."""
    tokens = [*first.tokens[:-1], ",", "while", *second.tokens]
    shift = len(first.tokens) + 1  # the "." became "," and "while" was added

    def moved(event: tuple[str, tuple[int, int], list[tuple[str, int, int, str, str]]]) -> Any:
        event_type, (start, end), arguments = event
        return (
            event_type,
            (start + shift, end + shift),
            [(role, s + shift, e + shift, text, kind) for role, s, e, text, kind in arguments],
        )

    entities = [*first.entities, *((s + shift, e + shift, text, kind) for s, e, text, kind in second.entities)]
    return _Sentence(tokens, [*first.events, *(moved(event) for event in second.events)], entities)


def _image_roles(rng: random.Random, event_type: str) -> list[str]:
    roles = list(IMAGE_ROLES[event_type])
    chosen = [role for role in roles if rng.random() < 0.7] or [roles[0]]
    # Some roles have two instances (two protesters, two officers), as in the real annotations.
    return chosen + [role for role in chosen if rng.random() < 0.25]


def _write_m2e2(directory: Path, rng: random.Random, size: int) -> dict[str, Any]:
    text_only: list[dict[str, Any]] = []
    text_multimedia: list[dict[str, Any]] = []
    image_only: dict[str, Any] = {}
    image_multimedia: dict[str, Any] = {}
    coref: list[str] = []
    text_events: Counter[str] = Counter()
    overlap = 0
    sentences = 0
    n_docs = max(2, size // 8)
    for doc in range(n_docs):
        doc_id = f"VOA_EN_NW_2020.{1 + doc % 12:02d}.{1 + doc % 28:02d}.{3000000 + doc}"
        main_type = EVENT_TYPES[doc % len(EVENT_TYPES)]
        n_images = rng.randint(2, 4)
        image_names = [f"{doc_id}_{i}.jpg" for i in range(n_images)]
        # Image 0 is the multimedia image of the main event; then image-only events; the last may have no event.
        multimedia_images = [0] + ([1] if n_images > 2 and rng.random() < 0.4 else [])
        for i in range(n_images):
            width, height = _image_size(rng, rng.randint(600, 700), 900)
            if i in multimedia_images:
                event_type, target = main_type, image_multimedia
            elif i < n_images - 1 or rng.random() < 0.5:
                event_type, target = rng.choice(EVENT_TYPES), image_only
            else:
                event_type, target = None, None
            roles = _image_roles(rng, event_type) if event_type else []
            image, placed = draw_scene(rng, width, height, event_type, roles)
            _save_jpeg(image, directory / "image" / image_names[i])
            if event_type is None or target is None:
                continue
            role_boxes: dict[str, list[list[Any]]] = {}
            for role, box in placed:
                role_boxes.setdefault(role, []).append(["1", *box])
            for boxed in role_boxes.values():
                if len(boxed) > 1:  # a "0" group box around the instances, like the real crowd boxes
                    x1, y1 = min(b[1] for b in boxed), min(b[2] for b in boxed)
                    x2, y2 = max(b[3] for b in boxed), max(b[4] for b in boxed)
                    boxed.append(["0", x1, y1, x2, y2])
            target[image_names[i].removesuffix(".jpg")] = {"role": role_boxes, "event_type": event_type}
        # Sentences: indices with gaps (as in the real documents); the first two carry the multimedia event.
        n_sentences = rng.randint(6, 10)
        indices = sorted(rng.sample(range(n_sentences + 4), n_sentences))
        offset = 0
        for position, index in enumerate(indices):
            sentence_id = f"{doc_id}_{index}"
            if position < 2:
                # The multimedia sentence(s); the first doc's first one also has a text-only event (the overlap).
                multimedia = _event_sentence(rng, main_type)
                if position == 0 and doc % 4 == 0:
                    other = rng.choice([t for t in EVENT_TYPES if t != main_type])
                    sentence = _joined(_event_sentence(rng, other), multimedia)
                    text_only_events, multimedia_events = [0], [1]
                    overlap += 1
                else:
                    sentence, text_only_events, multimedia_events = multimedia, [], [0]
            elif rng.random() < 0.5:
                sentence = _event_sentence(rng, rng.choice(EVENT_TYPES))
                text_only_events, multimedia_events = [0], []
            else:
                sentence, text_only_events, multimedia_events = _negative_sentence(rng), [], []
            if text_only_events or not multimedia_events:
                text_only.append(_m2e2_sentence_item(sentence_id, sentence, offset, text_only_events, image_names))
            if multimedia_events:
                text_multimedia.append(
                    _m2e2_sentence_item(sentence_id, sentence, offset, multimedia_events, image_names)
                )
                coref += [f"{sentence_id}\t{image_names[i]}\t{main_type}" for i in multimedia_images]
            for k in (*text_only_events, *multimedia_events):
                text_events[sentence.events[k][0]] += 1
            sentences += 1
            offset += len(" ".join(sentence.tokens)) + 2
    annotations = directory / "m2e2_annotations"
    # The real files: json.dumps(indent=4) with ASCII escapes and no final newline (the coref file too).
    for name, obj in (
        ("text_only_event.json", text_only),
        ("text_multimedia_event.json", text_multimedia),
        ("image_only_event.json", image_only),
        ("image_multimedia_event.json", image_multimedia),
    ):
        _write_json(annotations / name, obj, indent=4)
    (annotations / "crossmedia_coref.txt").write_text("\n".join(coref), encoding="utf-8")
    annotated = (*image_only.values(), *image_multimedia.values())
    image_boxes = sum(len(boxed) for entry in annotated for boxed in entry["role"].values())
    return {
        "documents": n_docs,
        "sentences": sentences,
        "text_events": sum(text_events.values()),
        "text_events_by_type": dict(sorted(text_events.items())),
        "overlapping_sentences": overlap,
        "images": sum(1 for _ in (directory / "image").iterdir()),
        "image_events": len(image_only) + len(image_multimedia),
        "image_only_events": len(image_only),
        "image_multimedia_events": len(image_multimedia),
        "image_boxes": image_boxes,
        "coref_links": len(coref),
    }


# --- chat (rmpl_ds.sources.chat) ------------------------------------------------------------------------------

CHAT_SYSTEM = "You answer questions about event pictures and news sentences briefly."
# Conversations per chat file (one per layout), as a share of ``size``.
_CHAT_SHARE = 5


def _chat_rounds(rng: random.Random, event_type: str | None, roles: Sequence[str]) -> list[tuple[str, str]]:
    """(question, answer) rounds about one demo scene: the answers are what its glyphs encode."""
    if event_type is None:
        return [("Which event does the picture show?", "None: only grey shapes, no event.")]
    shape, _ = TYPE_GLYPHS[event_type]
    rounds = [
        ("Which event does the picture show?", f"{event_type}, drawn as the large {shape}."),
        ("Which roles are marked in it?", ", ".join(sorted(roles)) + "." if roles else "None are marked."),
    ]
    return rounds[: rng.randint(1, 2)]


def _text_rounds(rng: random.Random) -> list[tuple[str, str]]:
    event_type = rng.choice(EVENT_TYPES)
    trigger = rng.choice(TRIGGERS[event_type])
    return [(f"Which event type does the word '{trigger}' signal?", f"{event_type}.")]


def _write_chat(directory: Path, rng: random.Random, size: int) -> dict[str, Any]:
    """Three small chat sets of the same kind of conversations, one per layout of rmpl_ds.sources.chat:
    ``llava_train.json`` (LLaVA), ``sharegpt_train.json`` (ShareGPT with a system column, two images in some
    conversations) and ``openai_train.jsonl`` (OpenAI messages with content parts, text-only ones too); the images
    in ``images/`` are demo scenes, paths relative to ``directory``."""
    count = max(2, size // _CHAT_SHARE)
    turns: Counter[int] = Counter()
    images = 0

    def scene(name: str) -> tuple[str, str | None, list[str]]:
        event_type = rng.choice(EVENT_TYPES) if rng.random() < 0.85 else None
        roles = _image_roles(rng, event_type) if event_type else []
        width, height = _image_size(rng, 224, 320)
        image, _ = draw_scene(rng, width, height, event_type, roles)
        _save_jpeg(image, directory / "images" / name)
        return f"images/{name}", event_type, roles

    llava = []
    for number in range(count):
        path, event_type, roles = scene(f"llava_{number:04d}.jpg")
        rounds = _chat_rounds(rng, event_type, roles)
        conversation = []
        for index, (question, answer) in enumerate(rounds):
            conversation.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
            conversation.append({"from": "gpt", "value": answer})
        llava.append({"id": f"llava-{number}", "image": path, "conversations": conversation})
        turns[len(rounds)] += 1
        images += 1
    _write_json(directory / "llava_train.json", llava, indent=1)

    sharegpt = []
    for number in range(count):
        shown = [scene(f"sharegpt_{number:04d}_{index}.jpg") for index in range(1 if number % 3 else 2)]
        conversation = []
        for index, (_, event_type, roles) in enumerate(shown):
            for round_number, (question, answer) in enumerate(_chat_rounds(rng, event_type, roles)):
                asked = question if round_number else f"<image>{question}"
                if index:
                    asked = asked.replace("the picture", "this second picture")
                conversation += [{"from": "human", "value": asked}, {"from": "gpt", "value": answer}]
        sharegpt.append(
            {"conversations": conversation, "system": CHAT_SYSTEM, "images": [path for path, _, _ in shown]}
        )
        turns[len(conversation) // 2] += 1
        images += len(shown)
    _write_json(directory / "sharegpt_train.json", sharegpt, indent=1)

    lines = []
    for number in range(count):
        if number % 4 == 3:
            rounds, paths = _text_rounds(rng), []
        else:
            path, event_type, roles = scene(f"openai_{number:04d}.jpg")
            rounds, paths = _chat_rounds(rng, event_type, roles), [path]
        messages: list[dict[str, Any]] = [{"role": "system", "content": CHAT_SYSTEM}]
        for index, (question, answer) in enumerate(rounds):
            content: list[dict[str, Any]] = [{"type": "text", "text": question}]
            if index == 0 and paths:
                content.insert(0, {"type": "image"})
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages, "images": paths}, separators=(",", ":")))
        turns[len(rounds)] += 1
        images += len(paths)
    (directory / "openai_train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "conversations": 3 * count,
        "by_format": {"llava": count, "openai": count, "sharegpt": count},
        "by_assistant_turns": {str(n): turns[n] for n in sorted(turns)},
        "images": images,
    }


# --- image-caption pairs (rmpl_ds.sources.pairs) ---------------------------------------------------------------

# What a demo pair shows, by position in a cycle of ten: the caption's event and the image's event are the same
# type (agree), different types (disagree), present in the caption only (text_only), in the image only
# (image_only), or absent from both (negative).
PAIR_KINDS: tuple[str, ...] = (
    "agree", "disagree", "agree", "text_only", "agree", "negative", "agree", "disagree", "agree", "image_only",
)  # fmt: skip
# Pairs as a share of ``size``.
_PAIRS_SHARE = 3


def _caption(rng: random.Random, sentence: _Sentence) -> str:
    """A sentence as a news caption: punctuation attached to the word before it, sometimes VOA's "FILE -"."""
    text = " ".join(sentence.tokens).replace(" .", ".").replace(" ,", ",")
    text = text[0].upper() + text[1:]
    return f"FILE - {text}" if rng.random() < 0.2 else text


def _write_pairs(directory: Path, rng: random.Random, size: int) -> dict[str, Any]:
    """``metadata.jsonl`` (``file_name``, ``text``, ``id``) with the images beside it (the ImageFolder layout)."""
    count = max(len(PAIR_KINDS), size // _PAIRS_SHARE)
    kinds: Counter[str] = Counter()
    agree_by_type: Counter[str] = Counter()
    lines = []
    for number in range(count):
        kind = PAIR_KINDS[number % len(PAIR_KINDS)]
        text_type = EVENT_TYPES[number % len(EVENT_TYPES)] if kind in ("agree", "disagree", "text_only") else None
        if kind == "disagree":
            image_type: str | None = rng.choice([t for t in EVENT_TYPES if t != text_type])
        elif kind == "image_only":
            image_type = rng.choice(EVENT_TYPES)
        else:
            image_type = text_type if kind == "agree" else None
        sentence = _event_sentence(rng, text_type) if text_type else _negative_sentence(rng)
        width, height = _image_size(rng, 224, 320)
        image, _ = draw_scene(rng, width, height, image_type, _image_roles(rng, image_type) if image_type else [])
        file_name = f"pair_{number:05d}.jpg"
        _save_jpeg(image, directory / file_name)
        line = {"file_name": file_name, "text": _caption(rng, sentence), "id": f"voa_demo_{number:05d}"}
        lines.append(json.dumps(line, separators=(",", ":")))
        kinds[kind] += 1
        if kind == "agree":
            agree_by_type[text_type] += 1  # type: ignore[index]
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "pairs": count,
        "by_kind": dict(sorted(kinds.items())),
        "agree_by_type": dict(sorted(agree_by_type.items())),
        "images": count,
    }
