"""The M2E2 event ontology and the label sets of the Stage I sources, in one place.

Derived from the real M2E2 annotation files (see shared/notes/FORMATS.md §1): 8 event types in ACE
``Type:Subtype`` spelling, 15 text roles and 16 roles over both modalities (images add ``Money`` and never use
``Destination`` or ``Origin``), with a one-sentence definition of each type (:data:`DEFINITIONS`, our paraphrase of
the ACE 2005 guidelines). MNRE has 23 relation labels including ``None``.

The source mappings live here too: the 33 ACE 2005 event types and which of them are M2E2 types
(:data:`ACE_TO_M2E2`), the imSitu verb -> M2E2 type/role table of M2E2's ``ace_sr_mapping.txt``
(:func:`imsitu_verb_mappings`), and MNRE version 1's label set (:data:`MNRE_V1_RELATION_LABELS`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from rmpl_ds import resources

EVENT_TYPES: tuple[str, ...] = (
    "Conflict:Attack",
    "Conflict:Demonstrate",
    "Contact:Meet",
    "Contact:Phone-Write",
    "Justice:Arrest-Jail",
    "Life:Die",
    "Movement:Transport",
    "Transaction:Transfer-Money",
)

# Event type -> what it means: one sentence each, paraphrasing the ACE 2005 event annotation guidelines. Schema
# instructions (rmpl_ds.tasks: the ``ts`` questions and schema-guided prompts) show them to the model.
DEFINITIONS: dict[str, str] = {
    "Conflict:Attack": "a violent physical act by one party that causes or is meant to cause harm or damage to "
    "another party or a place",
    "Conflict:Demonstrate": "a large number of people gather in a public place to protest or to demand something "
    "from an authority",
    "Contact:Meet": "two or more parties come together face to face at one place to talk or interact",
    "Contact:Phone-Write": "two or more parties communicate without meeting in person: by telephone, letter, e-mail "
    "or a written message",
    "Justice:Arrest-Jail": "a person is taken into custody or held in detention by an authority",
    "Life:Die": "a person's life ends, by violence, accident, illness or natural causes",
    "Movement:Transport": "an agent moves people or things from one place to another, possibly in a vehicle",
    "Transaction:Transfer-Money": "money is given, lent, paid or donated by one party to another",
}

# Event type -> the argument roles it takes in text (M2E2 text files; TextEE's valid patterns agree).
TEXT_ROLES: dict[str, tuple[str, ...]] = {
    "Conflict:Attack": ("Attacker", "Instrument", "Place", "Target"),
    "Conflict:Demonstrate": ("Entity", "Place", "Police"),
    "Contact:Meet": ("Entity", "Place"),
    "Contact:Phone-Write": ("Entity", "Place"),
    "Justice:Arrest-Jail": ("Agent", "Person", "Place"),
    "Life:Die": ("Agent", "Instrument", "Place", "Victim"),
    "Movement:Transport": ("Agent", "Artifact", "Destination", "Origin", "Vehicle"),
    "Transaction:Transfer-Money": ("Giver", "Recipient"),
}

# Event type -> the argument roles it takes in images (M2E2 image files).
IMAGE_ROLES: dict[str, tuple[str, ...]] = {
    "Conflict:Attack": ("Attacker", "Instrument", "Target"),
    "Conflict:Demonstrate": ("Entity", "Instrument", "Place", "Police"),
    "Contact:Meet": ("Entity",),
    "Contact:Phone-Write": ("Entity", "Instrument"),
    "Justice:Arrest-Jail": ("Agent", "Instrument", "Person"),
    "Life:Die": ("Instrument", "Victim"),
    "Movement:Transport": ("Agent", "Artifact", "Vehicle"),
    "Transaction:Transfer-Money": ("Giver", "Money", "Recipient"),
}

ROLES: tuple[str, ...] = tuple(
    sorted({role for roles in (*TEXT_ROLES.values(), *IMAGE_ROLES.values()) for role in roles})
)

# MNRE v2 labels in the community id order of ours_rel2id.json (None = 0). Spellings are the real ones ("alumi").
RELATION_LABELS: tuple[str, ...] = (
    "None",
    "/per/per/parent",
    "/per/per/siblings",
    "/per/per/couple",
    "/per/per/neighbor",
    "/per/per/peer",
    "/per/per/charges",
    "/per/per/alumi",
    "/per/per/alternate_names",
    "/per/org/member_of",
    "/per/loc/place_of_residence",
    "/per/loc/place_of_birth",
    "/org/org/alternate_names",
    "/org/org/subsidiary",
    "/org/loc/locate_at",
    "/loc/loc/contain",
    "/per/misc/present_in",
    "/per/misc/awarded",
    "/per/misc/race",
    "/per/misc/religion",
    "/per/misc/nationality",
    "/misc/misc/part_of",
    "/misc/loc/held_on",
)

# MNRE version 1 (Version-1/mnre_txt_org.zip): lowercase ``none`` for no relation, and labels that v2 dropped or
# renamed ("/per/misc/creat" sic). The set is the label dict of public v1 evaluation code; FORMATS.md counts 29
# labels in the real files, so one v1 label may be missing here: a line carrying it is skipped with the reason
# "unknown relation label" and shows up, with examples, in the manifest.
MNRE_V1_NO_RELATION = "none"
MNRE_V1_RELATION_LABELS: tuple[str, ...] = (
    MNRE_V1_NO_RELATION,
    "/per/loc/place_of_birth",
    "/loc/loc/contain",
    "/per/per/charges",
    "/per/per/peer",
    "/org/loc/locate_at",
    "/per/org/member_of",
    "/per/per/alternate_names",
    "/per/misc/present_in",
    "/per/per/colleague",
    "/misc/misc/part_of",
    "/per/misc/creat",
    "/org/org/subsidiary",
    "/loc/loc/capital",
    "/per/loc/place_of_residence",
    "/per/loc/place_of_death",
    "/per/per/couple",
    "/per/misc/awarded",
    "/loc/loc/administration_divisions",
    "/per/org/leader",
    "/misc/loc/held_on",
    "/per/misc/nationality",
    "/per/per/parent",
    "/per/org/founder_of",
    "/per/per/siblings",
    "/org/org/alternate_names",
    "/per/per/relative",
    "/per/per/neighbor",
)
NO_RELATION = "None"

# The 33 ACE 2005 event types (LDC guidelines v5.4.3), ``Type:Subtype`` as the preprocessed files spell them.
ACE_EVENT_TYPES: tuple[str, ...] = (
    "Life:Be-Born",
    "Life:Marry",
    "Life:Divorce",
    "Life:Injure",
    "Life:Die",
    "Movement:Transport",
    "Transaction:Transfer-Ownership",
    "Transaction:Transfer-Money",
    "Business:Start-Org",
    "Business:Merge-Org",
    "Business:Declare-Bankruptcy",
    "Business:End-Org",
    "Conflict:Attack",
    "Conflict:Demonstrate",
    "Contact:Meet",
    "Contact:Phone-Write",
    "Personnel:Start-Position",
    "Personnel:End-Position",
    "Personnel:Nominate",
    "Personnel:Elect",
    "Justice:Arrest-Jail",
    "Justice:Release-Parole",
    "Justice:Trial-Hearing",
    "Justice:Charge-Indict",
    "Justice:Sue",
    "Justice:Convict",
    "Justice:Sentence",
    "Justice:Fine",
    "Justice:Execute",
    "Justice:Extradite",
    "Justice:Acquit",
    "Justice:Appeal",
    "Justice:Pardon",
)

# ACE type -> M2E2 type, or None for the 25 types M2E2 does not annotate (their mentions are dropped, so the
# sentence becomes a negative or is left out, by the converter's option). The 8 M2E2 types are ACE types, so the
# mapping is the identity on them; it is spelled out so that a future alias (e.g. Life:Injure) is one line here.
ACE_TO_M2E2: dict[str, str | None] = {
    ace_type: (ace_type if ace_type in EVENT_TYPES else None) for ace_type in ACE_EVENT_TYPES
}


def normalize_mapping_type(written: str) -> str | None:
    """The M2E2 event type that ``ace_sr_mapping.txt`` writes as ``written``, or None if it is none of the 8.

    The file uses the original code's normalized spelling (``:`` -> ``||``, ``-`` -> ``|``) and is not consistent
    about case (``Transaction||Transfer|MONEY`` next to ``...|Money``), so the comparison ignores case.
    """
    by_normalized = {event_type.replace(":", "||").replace("-", "|").lower(): event_type for event_type in EVENT_TYPES}
    return by_normalized.get(written.strip().lower())


@dataclass(frozen=True)
class VerbMapping:
    """What an imSitu verb means in M2E2: its event type and imSitu role -> M2E2 role for the mapped roles."""

    verb: str
    event_type: str
    roles: dict[str, str]


def parse_verb_mappings(text: str, name: str = "ace_sr_mapping.txt") -> dict[str, VerbMapping]:
    """Parse ``ace_sr_mapping.txt`` (TSV: imSitu verb, imSitu role, normalized ACE type, ACE role).

    Tolerates CRLF endings (the UniCL copy) and a missing final newline (the original). Raises ValueError naming
    the line for a row with the wrong number of columns, an event type that is none of the 8, or a verb mapped to
    two different types.
    """
    mappings: dict[str, VerbMapping] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        columns = line.rstrip("\r").split("\t")
        if len(columns) != 4:
            raise ValueError(f"{name}:{line_number}: expected 4 tab-separated columns, found {len(columns)}")
        verb, imsitu_role, written_type, m2e2_role = (column.strip() for column in columns)
        event_type = normalize_mapping_type(written_type)
        if event_type is None:
            raise ValueError(f"{name}:{line_number}: {written_type!r} is not one of the 8 M2E2 event types")
        mapping = mappings.setdefault(verb, VerbMapping(verb, event_type, {}))
        if mapping.event_type != event_type:
            raise ValueError(
                f"{name}:{line_number}: verb {verb!r} maps to {event_type}, earlier to {mapping.event_type}"
            )
        mapping.roles[imsitu_role] = m2e2_role
    return mappings


@functools.cache
def imsitu_verb_mappings() -> dict[str, VerbMapping]:
    """The packaged M2E2 mapping: 67 imSitu verbs -> one of the 8 types each (cached; do not mutate)."""
    return parse_verb_mappings(resources.read_text("ace_sr_mapping.txt"))
