"""imSitu / SWiG converter and the ace_sr_mapping.txt verb mapping, on the real samples and on bad input.

Counts were read off shared/fixtures/real/{imsitu,swig,m2e2} by hand: of the 36 sampled imSitu records
(train 9, dev 18, test 9) 24 have a verb of ace_sr_mapping.txt (dev 12, train 6, test 6), and the fixture's
imsitu_space.json knows none of the 27 nouns they use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from rmpl_ds import resources
from rmpl_ds.errors import UserError
from rmpl_ds.ontology import imsitu_verb_mappings, parse_verb_mappings
from rmpl_ds.records import VisualArgument
from rmpl_ds.sources import SOURCES, SourceError
from rmpl_ds.sources import base as reasons


@pytest.fixture(scope="session")
def imsitu_dir(real_fixtures: Path) -> Path:
    return real_fixtures / "imsitu"


HANDCUFFING = {
    "verb": "handcuffing",
    "height": 600,
    "width": 512,
    "bb": {"place": [-1, -1, -1, -1], "victim": [-1, -1, -1, -1], "agent": [10, 20, 200, 300]},
    "frames": [
        {"place": "n06410904", "victim": "n10287213", "agent": "n10287213"},
        {"place": "n06410904", "victim": "n10287213", "agent": "n10287213"},
        {"place": "", "victim": "n10287213", "agent": "n10287213"},
    ],
}


def swig_dir(imsitu_dir: Path, tmp_path: Path, records: dict, *, space: bool = True, name: str = "dev.json") -> Path:
    directory = tmp_path / "SWiG_jsons"
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(json.dumps(records))
    if space:
        shutil.copy(imsitu_dir / "imsitu_space.json", directory / "imsitu_space.json")
    return directory


def test_packaged_mapping_is_the_real_file(real_fixtures: Path) -> None:
    assert resources.read_text("ace_sr_mapping.txt") == (real_fixtures / "m2e2" / "ace_sr_mapping.txt").read_text()


def test_mapping_quirks() -> None:
    mappings = imsitu_verb_mappings()
    assert len(mappings) == 67
    assert sum(len(mapping.roles) for mapping in mappings.values()) == 227
    per_type: dict[str, int] = {}
    for mapping in mappings.values():
        per_type[mapping.event_type] = per_type.get(mapping.event_type, 0) + 1
    assert per_type == {
        "Conflict:Attack": 18,
        "Conflict:Demonstrate": 5,
        "Contact:Meet": 7,
        "Contact:Phone-Write": 4,
        "Justice:Arrest-Jail": 8,
        "Life:Die": 3,
        "Movement:Transport": 20,
        "Transaction:Transfer-Money": 2,
    }
    # `buying payment` is written Transaction||Transfer|MONEY, its other rows ...|Money: one type all the same.
    assert mappings["buying"].event_type == "Transaction:Transfer-Money"
    assert mappings["buying"].roles == {
        "agent": "Giver",
        "payment": "Instrument",
        "place": "Place",
        "seller": "Recipient",
    }
    assert mappings["phoning"].event_type == "Contact:Phone-Write"  # `||` and `|` separators
    assert mappings["talking"].roles["listener"] == "Entity"


def test_mapping_parser_tolerates_crlf_and_rejects_bad_rows() -> None:
    text = resources.read_text("ace_sr_mapping.txt")
    assert parse_verb_mappings(text.replace("\n", "\r\n")) == imsitu_verb_mappings()
    with pytest.raises(ValueError, match=r"x\.txt:2: 'Life\|\|Live' is not one of the 8"):
        parse_verb_mappings("arresting\tagent\tJustice||Arrest|Jail\tAgent\nliving\tagent\tLife||Live\tAgent", "x.txt")
    with pytest.raises(ValueError, match=r":2: verb 'arresting' maps to Life:Die"):
        parse_verb_mappings("arresting\tagent\tJustice||Arrest|Jail\tAgent\narresting\tplace\tLife||Die\tPlace")
    with pytest.raises(ValueError, match="expected 4 tab-separated columns"):
        parse_verb_mappings("arresting agent")


def test_imsitu_fixture_counts(imsitu_dir: Path) -> None:
    conversion = SOURCES["imsitu"](imsitu_dir)
    assert conversion.format == "imsitu" and conversion.skipped == []
    counts = conversion.counts
    assert counts["records"] == 36
    assert counts["by_split"] == {"dev": 18, "test": 9, "train": 9}
    assert counts["events"] == 24 and counts["negatives"] == 12
    assert counts["by_event_type"] == {
        "Conflict:Attack": 4,
        "Conflict:Demonstrate": 3,
        "Contact:Meet": 5,
        "Contact:Phone-Write": 1,
        "Justice:Arrest-Jail": 2,
        "Life:Die": 2,
        "Movement:Transport": 7,
    }
    assert (counts["arguments"], counts["ungrounded_arguments"], counts["boxes"]) == (46, 46, 0)
    # Place of Attack/Meet/Transport/... and Agent of Die (colliding) are not in M2E2's image schema.
    assert counts["dropped_roles"] == {"Agent": 2, "Place": 21}
    assert counts["unknown_noun_ids"] == 27
    assert len(counts["unmapped_verbs"]) == 12 and "hitchhiking" in counts["unmapped_verbs"]
    by_id = {record.id: record for record in conversion.records}
    (event,) = by_id["handcuffing_26.jpg"].events
    assert (event.event_type, event.verb) == ("Justice:Arrest-Jail", "handcuffing")
    assert [argument.role for argument in event.arguments] == ["Agent", "Person"]
    assert by_id["hitchhiking_238.jpg"].events == ()
    assert by_id["handcuffing_26.jpg"].width == 0  # imSitu has no size and no image was given

    without = SOURCES["imsitu"](imsitu_dir, keep_negatives=False)
    assert len(without.records) == 24 and without.counts["negatives_dropped"] == 12


def test_swig_readme_record_with_and_without_the_space_file(
    imsitu_dir: Path, real_fixtures: Path, tmp_path: Path
) -> None:
    alone = SOURCES["swig"](real_fixtures / "swig" / "README_example_dev.json")
    assert alone.format == "swig" and alone.counts["imsitu_space"] is False
    (record,) = alone.records
    assert (record.id, record.split, record.width, record.height, record.source) == (
        "hitchhiking_238.jpg",
        "dev",
        512,
        683,
        "swig",
    )
    assert record.events == () and alone.counts["unmapped_verbs"] == {"hitchhiking": 1}

    example = json.loads((real_fixtures / "swig" / "README_example_dev.json").read_text())
    with_space = SOURCES["swig"](swig_dir(imsitu_dir, tmp_path, example))
    assert with_space.counts["imsitu_space"] is True and len(with_space.records) == 1


def test_swig_boxes_and_the_ungrounded_marker(imsitu_dir: Path, tmp_path: Path) -> None:
    conversion = SOURCES["swig"](swig_dir(imsitu_dir, tmp_path, {"handcuffing_26.jpg": HANDCUFFING}, name="test.json"))
    (record,) = conversion.records
    (event,) = record.events
    # agent -> Agent with its box; victim -> Person, [-1,-1,-1,-1] = not grounded; place is not an image role.
    assert event.arguments == (VisualArgument("Agent", (10, 20, 200, 300)), VisualArgument("Person", None))
    assert conversion.counts["boxes"] == 1 and conversion.counts["ungrounded_arguments"] == 1
    assert conversion.counts["dropped_roles"] == {"Place": 1}


def test_noun_gloss_is_the_majority_vote(imsitu_dir: Path, tmp_path: Path) -> None:
    space = json.loads((imsitu_dir / "imsitu_space.json").read_text())
    space["nouns"]["n10287213"] = {"gloss": ["man", "adult male"], "def": "an adult person who is male"}
    directory = swig_dir(imsitu_dir, tmp_path, {"handcuffing_26.jpg": HANDCUFFING})
    (directory / "imsitu_space.json").write_text(json.dumps(space))
    (record,) = SOURCES["swig"](directory).records
    assert [argument.noun for argument in record.events[0].arguments] == ["man", "man"]


def _bad(change: str) -> dict:
    record = json.loads(json.dumps(HANDCUFFING))
    if change == "x2 < x1":
        record["bb"]["agent"] = [200, 20, 10, 300]
    elif change == "outside":
        record["bb"]["agent"] = [10, 20, 600, 300]
    elif change == "box not ints":
        record["bb"]["agent"] = [10, 20, "200", 300]
    elif change == "frames not a list":
        record["frames"] = {"agent": "n1"}
    elif change == "unknown verb":
        record["verb"] = "teleporting"
    elif change == "unknown role":
        record["frames"][1]["weapon"] = "n1"
    elif change == "missing role":
        del record["frames"][0]["victim"]
    return record


@pytest.mark.parametrize(
    ("change", "reason", "path"),
    [
        ("x2 < x1", reasons.BAD_BOX, "bb.agent"),
        ("outside", reasons.BOX_OUTSIDE, "bb.agent"),
        ("box not ints", reasons.WRONG_TYPE, "bb.agent"),
        ("frames not a list", reasons.WRONG_TYPE, "frames"),
        ("unknown verb", reasons.UNKNOWN_VERB, "verb"),
        ("unknown role", reasons.UNKNOWN_ROLE, "frames[1].weapon"),
        ("missing role", reasons.MISSING_FIELD, "frames[0]"),
    ],
)
def test_bad_records_are_skipped_or_fail_under_strict(
    imsitu_dir: Path, tmp_path: Path, change: str, reason: str, path: str
) -> None:
    directory = swig_dir(imsitu_dir, tmp_path, {"handcuffing_26.jpg": HANDCUFFING, "handcuffing_27.jpg": _bad(change)})
    conversion = SOURCES["swig"](directory)
    assert [record.id for record in conversion.records] == ["handcuffing_26.jpg"]
    (skip,) = conversion.skipped
    assert (skip.line_or_key, skip.reason) == (f"'handcuffing_27.jpg'.{path}", reason)
    with pytest.raises(SourceError) as raised:
        SOURCES["swig"](directory, strict=True)
    assert str(raised.value).startswith(f"{directory / 'dev.json'}:'handcuffing_27.jpg'.{path}: {reason}")


def test_malformed_split_file(imsitu_dir: Path, tmp_path: Path) -> None:
    # A split file that does not parse, or is not an object, loses all its records: an error even without --strict.
    directory = swig_dir(imsitu_dir, tmp_path, {"handcuffing_26.jpg": HANDCUFFING})
    (directory / "dev.json").write_text('{"a.jpg": {\n "verb": ')
    for strict in (False, True):
        with pytest.raises(UserError, match=r"dev\.json:2: invalid JSON: .*must parse as a whole"):
            SOURCES["swig"](directory, strict=strict)
    (directory / "dev.json").write_text('["a.jpg"]')
    with pytest.raises(UserError, match=r"dev\.json: expected a JSON object keyed by image file name, found an array"):
        SOURCES["swig"](directory)
    # imsitu_space.json too: a truncated one must not silently turn the verb and role checks off.
    swig_dir(imsitu_dir, tmp_path, {"handcuffing_26.jpg": HANDCUFFING})
    space = directory / "imsitu_space.json"
    truncated = space.read_text()[:100]
    space.unlink()  # copied read-only from the fixtures
    space.write_text(truncated)
    with pytest.raises(UserError, match=r"imsitu_space\.json:\d+: invalid JSON"):
        SOURCES["imsitu"](directory)


def test_images_are_checked_when_given(imsitu_dir: Path, tmp_path: Path) -> None:
    records = {name: HANDCUFFING for name in ("handcuffing_1.jpg", "handcuffing_2.jpg", "handcuffing_3.jpg")}
    records["handcuffing_4.jpg"] = HANDCUFFING
    directory = swig_dir(imsitu_dir, tmp_path, records)
    images = tmp_path / "images_512"
    images.mkdir()
    Image.new("RGB", (512, 600), "white").save(images / "handcuffing_1.jpg")
    (images / "handcuffing_2.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (600, 512), "white").save(images / "handcuffing_4.jpg")
    conversion = SOURCES["swig"](directory, images_dir=images)
    assert [record.id for record in conversion.records] == ["handcuffing_1.jpg"]
    assert [(skip.line_or_key, skip.reason) for skip in conversion.skipped] == [
        ("'handcuffing_2.jpg'", reasons.UNREADABLE_IMAGE),
        ("'handcuffing_3.jpg'", reasons.IMAGE_NOT_FOUND),
        ("'handcuffing_4.jpg'", reasons.IMAGE_SIZE_MISMATCH),
    ]
    assert str(conversion.skipped[1]).endswith(f"'handcuffing_3.jpg': image not found: {images / 'handcuffing_3.jpg'}")
    with pytest.raises(SourceError, match=r"handcuffing_2\.jpg.*unreadable image"):
        SOURCES["swig"](directory, images_dir=images, strict=True)

    # Plain imSitu takes the size from the image.
    plain = tmp_path / "imsitu"
    plain.mkdir()
    (plain / "train.json").write_text(
        json.dumps({"handcuffing_1.jpg": {"frames": HANDCUFFING["frames"], "verb": "handcuffing"}})
    )
    (record,) = SOURCES["imsitu"](plain, images_dir=images).records
    assert (record.width, record.height, record.source) == (512, 600, "imsitu")
