"""ACE 2005 converter (rmpl_ds.sources.ace) on the real samples of the three formats, and on bad input.

Counts below were read off the files in shared/fixtures/real/ace2005 by hand (see PROVENANCE.md there).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from rmpl_ds.errors import UserError
from rmpl_ds.ontology import ACE_EVENT_TYPES, ACE_TO_M2E2, EVENT_TYPES
from rmpl_ds.records import TextArgument, Trigger
from rmpl_ds.sources import SOURCES, SourceError
from rmpl_ds.sources import base as reasons


@pytest.fixture(scope="session")
def ace_dir(real_fixtures: Path) -> Path:
    return real_fixtures / "ace2005"


convert = SOURCES["ace"]

ATTACK_SENTENCE = {
    "sentence": "Rebels attacked the convoy in Aleppo on Monday .",
    "golden-entity-mentions": [
        {"text": "Rebels", "entity-type": "ORG:Non-Governmental", "entity_id": "D-E1-1", "start": 0, "end": 1},
        {"text": "the convoy", "entity-type": "VEH:Land", "entity_id": "D-E2-2", "start": 2, "end": 4},
    ],
    "golden-event-mentions": [
        {
            "trigger": {"text": "attacked", "start": 1, "end": 2},
            "arguments": [
                {"role": "Attacker", "text": "Rebels", "start": 0, "end": 1},
                {"role": "Target", "text": "the convoy", "start": 2, "end": 4},
                {"role": "Place", "text": "Aleppo", "start": 5, "end": 6},
                {"role": "Time-Within", "text": "on Monday", "start": 6, "end": 8},
            ],
            "event_type": "Conflict:Attack",
        }
    ],
    "words": ["Rebels", "attacked", "the", "convoy", "in", "Aleppo", "on", "Monday", "."],
}


def write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def test_ontology_maps_33_ace_types_onto_the_8_m2e2_types() -> None:
    assert len(ACE_EVENT_TYPES) == 33 == len(set(ACE_EVENT_TYPES))
    kept = {ace: m2e2 for ace, m2e2 in ACE_TO_M2E2.items() if m2e2 is not None}
    assert kept == {event_type: event_type for event_type in EVENT_TYPES}


def test_nlpcl_lab_sample_becomes_a_negative(ace_dir: Path) -> None:
    conversion = convert(ace_dir / "nlpcl-lab_ace2005-preprocessing")  # data_list.csv beside it is not read
    assert conversion.format == "nlpcl-lab"
    assert conversion.skipped == []
    (sentence,) = conversion.records
    assert sentence.id == "sample-0" and sentence.split == "all" and sentence.source == "ace"
    assert len(sentence.tokens) == 31 and sentence.tokens[11] == "Welch"
    assert sentence.events == ()  # Personnel:End-Position is not an M2E2 type
    assert conversion.counts["dropped_event_types"] == {"Personnel:End-Position": 1}
    assert conversion.counts["negatives"] == 1

    dropped = convert(ace_dir / "nlpcl-lab_ace2005-preprocessing", keep_negatives=False)
    assert dropped.records == [] and dropped.counts["negatives_dropped"] == 1


def test_jmee_sample_keeps_die_and_drops_the_time_role(ace_dir: Path) -> None:
    conversion = convert(ace_dir / "JMEE")  # the new_filelist_ACE_* split lists have no .json suffix
    assert conversion.format == "jmee"
    (sentence,) = conversion.records
    assert len(sentence.tokens) == 35
    (event,) = sentence.events
    assert event.event_type == "Life:Die"
    assert event.trigger == Trigger(19, 20, "dead")
    assert event.arguments == (
        TextArgument("Place", 14, 15, "where"),
        TextArgument("Victim", 15, 21, "a 22-year-old woman 's dead infant"),
    )
    assert conversion.counts["dropped_roles"] == {"Time-Before": 1}
    assert conversion.counts["by_event_type"] == {"Life:Die": 1}


def test_oneie_sample_resolves_ids_and_drops_justice_types(ace_dir: Path) -> None:
    conversion = convert(ace_dir / "oneie_format" / "example.oneie.json")
    assert conversion.format == "oneie"
    (sentence,) = conversion.records
    assert sentence.id == "AFP_ENG_20030427.0118-1"
    assert sentence.document_id == "AFP_ENG_20030427.0118"
    assert len(sentence.tokens) == 24 and sentence.events == ()
    assert conversion.counts["dropped_event_types"] == {"Justice:Convict": 1, "Justice:Sentence": 1}


def test_oneie_arguments_are_resolved_through_entity_ids(ace_dir: Path, tmp_path: Path) -> None:
    line = json.loads((ace_dir / "oneie_format" / "example.oneie.json").read_text())
    line["event_mentions"][0]["event_type"] = "Justice:Arrest-Jail"
    line["event_mentions"][0]["arguments"] = [
        {"entity_id": "AFP_ENG_20030427.0118-E39-56", "text": "police", "role": "Agent"},
        {"entity_id": "AFP_ENG_20030427.0118-E38-55", "text": "man", "role": "Person"},
        {"entity_id": "AFP_ENG_20030427.0118-E37-54", "text": "province", "role": "Place"},
    ]
    path = tmp_path / "test.oneie.json"
    path.write_text(json.dumps(line) + "\n")
    (sentence,) = convert(path).records
    (event,) = sentence.events
    assert sentence.split == "test"
    assert event.arguments == (
        TextArgument("Agent", 20, 21, "police"),
        TextArgument("Person", 11, 12, "man"),
        TextArgument("Place", 6, 7, "province"),
    )


def test_directory_of_split_files(ace_dir: Path, tmp_path: Path) -> None:
    negative = json.loads((ace_dir / "nlpcl-lab_ace2005-preprocessing" / "sample.json").read_text())[0]
    write_json(tmp_path / "train.json", [ATTACK_SENTENCE, negative])
    write_json(tmp_path / "dev.json", [ATTACK_SENTENCE])
    write_json(tmp_path / "test.json", [negative])
    (tmp_path / "data_list.csv").write_text("type,path\n")
    conversion = convert(tmp_path)
    assert [record.id for record in conversion.records] == ["dev-0", "test-0", "train-0", "train-1"]
    assert conversion.counts["by_split"] == {"dev": 1, "test": 1, "train": 2}
    assert conversion.counts["events"] == 2 and conversion.counts["negatives"] == 2
    assert conversion.counts["dropped_roles"] == {"Time-Within": 2}
    roles = [argument.role for argument in conversion.records[0].events[0].arguments]
    assert roles == ["Attacker", "Target", "Place"]


def _bad_sentence(change: str) -> dict:
    sentence = copy.deepcopy(ATTACK_SENTENCE)
    event = sentence["golden-event-mentions"][0]
    if change == "wrong type":
        sentence["words"] = "Rebels attacked the convoy"
    elif change == "trigger outside":
        event["trigger"]["end"] = 40
    elif change == "argument outside":
        event["arguments"][0]["start"] = -1
    elif change == "unknown type":
        event["event_type"] = "Conflict:Explode"
    elif change == "offset not int":
        event["trigger"]["start"] = "1"
    return sentence


@pytest.mark.parametrize(
    ("change", "reason", "where"),
    [
        ("wrong type", reasons.WRONG_TYPE, "[1].words"),
        ("trigger outside", reasons.OFFSET_OUTSIDE, "[1].golden-event-mentions[0].trigger"),
        ("argument outside", reasons.OFFSET_OUTSIDE, "[1].golden-event-mentions[0].arguments[0]"),
        ("unknown type", reasons.UNKNOWN_EVENT_TYPE, "[1].golden-event-mentions[0].event_type"),
        ("offset not int", reasons.WRONG_TYPE, "[1].golden-event-mentions[0].trigger.start"),
    ],
)
def test_bad_sentences_are_skipped_or_fail_under_strict(tmp_path: Path, change: str, reason: str, where: str) -> None:
    path = write_json(tmp_path / "train.json", [ATTACK_SENTENCE, _bad_sentence(change), ATTACK_SENTENCE])
    conversion = convert(path)
    assert len(conversion.records) == 2
    (skip,) = conversion.skipped
    assert (skip.file, skip.line_or_key, skip.reason) == (str(path), where, reason)

    with pytest.raises(SourceError) as raised:
        convert(path, strict=True)
    assert str(raised.value).startswith(f"{path}:{where}: {reason}")


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    # A truncated array loses every sentence in it: an error even without --strict, never one skipped record.
    path = tmp_path / "dev.json"
    text = json.dumps([ATTACK_SENTENCE, ATTACK_SENTENCE], indent=2)[:-30]
    path.write_text(text)
    last_line = text.count("\n") + 1
    for strict in (False, True):
        with pytest.raises(UserError) as raised:
            convert(path, strict=strict)
        assert str(raised.value).startswith(f"{path}:{last_line}: invalid JSON: ")
    (tmp_path / "dev.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"dev\.json:1: invalid JSON: .*must parse as a whole"):
        convert(path)


def test_a_non_utf8_line_of_oneie_json_lines_is_one_skipped_record(ace_dir: Path, tmp_path: Path) -> None:
    good = (ace_dir / "oneie_format" / "example.oneie.json").read_bytes().strip()
    other = json.loads(good)
    other["sent_id"] = "other-1"
    path = tmp_path / "train.oneie.json"
    path.write_bytes(good + b"\n" + b'{"sent_id": "caf\xe9"}\n' + json.dumps(other).encode() + b"\n")
    conversion = convert(path)
    assert [record.id for record in conversion.records] == ["AFP_ENG_20030427.0118-1", "other-1"]
    (skip,) = conversion.skipped
    assert (skip.file, skip.line_or_key, skip.reason) == (str(path), "2", reasons.NOT_UTF8)
    with pytest.raises(SourceError) as raised:
        convert(path, strict=True)
    assert str(raised.value).startswith(f"{path}:2: not UTF-8 text: invalid continuation byte")
    # In a JSON array the same byte makes the whole file unreadable: an error naming the line.
    array = tmp_path / "dev.json"
    array.write_bytes(b'[\n  {"words": ["caf\xe9"]}\n]')
    with pytest.raises(UserError, match=r"dev\.json:2: not UTF-8 text \(invalid continuation byte at byte 19\)"):
        convert(array)


def test_oneie_bad_lines_are_skipped_with_their_line_numbers(ace_dir: Path, tmp_path: Path) -> None:
    good = (ace_dir / "oneie_format" / "example.oneie.json").read_text().strip()
    unknown_entity = json.loads(good)
    unknown_entity["sent_id"] = "other-1"
    unknown_entity["event_mentions"][0]["event_type"] = "Life:Die"
    unknown_entity["event_mentions"][0]["arguments"][0]["entity_id"] = "nowhere"
    path = tmp_path / "train.oneie.json"
    path.write_text("\n".join([good, "{not json", json.dumps(unknown_entity), "[1, 2]"]) + "\n")
    conversion = convert(path)
    assert [record.id for record in conversion.records] == ["AFP_ENG_20030427.0118-1"]
    assert [(skip.line_or_key, skip.reason) for skip in conversion.skipped] == [
        ("2", reasons.MALFORMED),
        ("3", reasons.UNKNOWN_ENTITY),
        ("4", reasons.WRONG_TYPE),
    ]
    assert "event_mentions[0].arguments[0]" in conversion.skipped[1].detail
    with pytest.raises(SourceError, match=r"train\.oneie\.json:2: malformed input"):
        convert(path, strict=True)


def test_duplicate_sentence_ids_are_skipped(ace_dir: Path, tmp_path: Path) -> None:
    line = (ace_dir / "oneie_format" / "example.oneie.json").read_text().strip()
    path = tmp_path / "x.oneie.json"
    path.write_text(f"{line}\n{line}\n")
    conversion = convert(path)
    assert len(conversion.records) == 1
    assert [(skip.line_or_key, skip.reason) for skip in conversion.skipped] == [("2", reasons.DUPLICATE_ID)]


def test_missing_input_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        convert(tmp_path / "absent")
    with pytest.raises(UserError, match="no input files"):
        convert(tmp_path)
