"""M2E2 gold loader and converter on the real sample (shared/fixtures/real/m2e2) and on crafted bad files.

Counted by hand from the sample: text_only 20 sentences (16 with events, 21 events, 32 arguments), text_multimedia
9 sentences (9 events, 15 arguments), one sentence id in both (VOA_EN_NW_2016.02.10.3184811_28) -> 28 sentences;
image_only 10 images (51 boxes, 2 with flag "0"), image_multimedia 12 images (31 boxes, 4 with flag "0"); 12 coref
lines, one of which (VOA_EN_NW_2014.07.14.1957332_0.jpg, line 9) disagrees with the image file's type. The 11 text
documents plus 3 image-only documents make 14.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rmpl_ds.errors import UserError
from rmpl_ds.records import CrossMediaLink, Trigger
from rmpl_ds.sources import SOURCES, SourceError, load_m2e2
from rmpl_ds.sources import base as reasons
from rmpl_ds.sources.m2e2 import CorefInconsistency, document_of


@pytest.fixture(scope="session")
def m2e2_dir(real_fixtures: Path) -> Path:
    return real_fixtures / "m2e2"


OVERLAP_ID = "VOA_EN_NW_2016.02.10.3184811_28"


def copy_release(m2e2_dir: Path, tmp_path: Path) -> Path:
    """The five files in the zip's layout (``m2e2_annotations/``), ready to be edited."""
    folder = tmp_path / "m2e2_annotations"
    folder.mkdir()
    for name in (
        "text_only_event.json",
        "text_multimedia_event.json",
        "image_only_event.json",
        "image_multimedia_event.json",
        "crossmedia_coref.txt",
    ):
        shutil.copy(m2e2_dir / name, folder / name)
    return folder


def edit_json(path: Path, edit: Callable[[Any], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=4))


def test_gold_counts_of_the_sample(m2e2_dir: Path) -> None:
    gold = load_m2e2(m2e2_dir, strict=True)
    assert gold.counts() == {
        "sentences": 28,
        "sentences_with_events": 24,
        "text_events": 30,
        "text_arguments": 47,
        "text_events_by_setting": {"multimedia": 9, "text_only": 21},
        "images": 22,
        "image_events": 22,
        "image_boxes": 82,
        "image_events_by_setting": {"image_only": 10, "multimedia": 12},
        "coref_links": 12,
        "documents": 14,
        "overlapping_sentences": 1,
        "inconsistencies": 1,
    }
    flags = [argument.flag for image in gold.images for argument in image.events[0].arguments]
    assert flags.count("0") == 6 and flags.count("1") == 76
    assert {sentence.split for sentence in gold.sentences} == {"test"}


def test_overlapping_sentence_keeps_the_events_of_both_files(m2e2_dir: Path) -> None:
    gold = load_m2e2(m2e2_dir)
    assert gold.overlapping_sentence_ids == (OVERLAP_ID,)
    (sentence,) = [s for s in gold.sentences if s.id == OVERLAP_ID]
    assert [(e.event_type, e.setting) for e in sentence.events] == [
        ("Movement:Transport", "text_only"),
        ("Contact:Meet", "multimedia"),
    ]
    assert sentence.events[1].trigger == Trigger(16, 17, "conference")
    assert sentence.document_id == "VOA_EN_NW_2016.02.10.3184811"


def test_images_keep_pixel_boxes_flags_and_setting(m2e2_dir: Path) -> None:
    gold = load_m2e2(m2e2_dir)
    image = next(image for image in gold.images if image.id == "VOA_EN_NW_2015.11.26.3074855_1")
    (event,) = image.events
    assert (image.image, image.width, event.setting) == ("VOA_EN_NW_2015.11.26.3074855_1.jpg", 0, "multimedia")
    assert [(a.role, a.box, a.flag) for a in event.arguments] == [
        ("Person", (660, 214, 1366, 1630), "1"),
        ("Agent", (250, 191, 846, 1630), "1"),
        ("Agent", (1212, 240, 1782, 1630), "1"),
    ]


def test_coref_lines_and_the_real_disagreement(m2e2_dir: Path) -> None:
    gold = load_m2e2(m2e2_dir)
    assert gold.coref[0] == CrossMediaLink(
        "VOA_EN_NW_2015.11.26.3074855_5", "VOA_EN_NW_2015.11.26.3074855_1", "Justice:Arrest-Jail"
    )
    assert gold.inconsistencies == (
        CorefInconsistency(
            9,
            "VOA_EN_NW_2014.07.14.1957332_0",
            "VOA_EN_NW_2014.07.14.1957332_0",
            "Conflict:Demonstrate",
            "image",
            ("Justice:Arrest-Jail",),
        ),
    )
    # Kept, not dropped: the scorer decides what to do with it.
    assert len(gold.coref) == 12


def test_both_real_disagreements_with_a_crafted_second_one(m2e2_dir: Path, tmp_path: Path) -> None:
    folder = copy_release(m2e2_dir, tmp_path)
    sentence = next(
        s
        for s in json.loads((m2e2_dir / "text_multimedia_event.json").read_text())
        if s["sentence_id"] == "VOA_EN_NW_2014.07.14.1957332_0"
    )
    edit_json(
        folder / "text_multimedia_event.json",
        lambda data: data.append({**sentence, "sentence_id": "VOA_EN_NW_2017.05.01.3832748_2"}),
    )
    image = json.loads((m2e2_dir / "image_multimedia_event.json").read_text())["VOA_EN_NW_2014.07.14.1957332_0"]
    edit_json(
        folder / "image_multimedia_event.json", lambda data: data.update({"VOA_EN_NW_2017.05.01.3832748_0": image})
    )
    with (folder / "crossmedia_coref.txt").open("a") as handle:
        handle.write(
            "\nVOA_EN_NW_2017.05.01.3832748_2\tVOA_EN_NW_2017.05.01.3832748_0.jpg\tConflict:Demonstrate"
            "\nVOA_EN_NW_2015.11.26.3074855_5\tVOA_EN_NW_2016.02.10.3184811_3.jpg\tContact:Meet"
        )
    gold = load_m2e2(tmp_path)  # finds the m2e2_annotations/ folder of the zip
    assert [(item.line, item.image_id, item.side) for item in gold.inconsistencies] == [
        (9, "VOA_EN_NW_2014.07.14.1957332_0", "image"),
        (13, "VOA_EN_NW_2017.05.01.3832748_0", "image"),
        (14, "VOA_EN_NW_2016.02.10.3184811_3", "text"),  # that sentence is an Arrest-Jail, not a Meet
    ]
    assert str(gold.inconsistencies[2]).startswith("crossmedia_coref.txt:14: Contact:Meet for text")
    assert gold.counts()["coref_links"] == 14


def test_convert_gives_sentences_images_and_links(m2e2_dir: Path) -> None:
    conversion = SOURCES["m2e2"](m2e2_dir)
    assert conversion.format == "m2e2" and conversion.skipped == []
    assert conversion.counts["by_kind"] == {"crossmedia_link": 12, "image_record": 22, "text_sentence": 28}
    assert conversion.counts["m2e2"]["text_events"] == 30
    assert conversion.counts["inconsistencies"] == [
        "crossmedia_coref.txt:9: Conflict:Demonstrate for image VOA_EN_NW_2014.07.14.1957332_0, "
        "annotated as Justice:Arrest-Jail"
    ]
    assert len(SOURCES["m2e2"](m2e2_dir, keep_negatives=False).records) == 58


def test_document_ids_split_on_the_last_underscore() -> None:
    assert document_of("VOA_EN_NW_2015.11.26.3074855_5") == "VOA_EN_NW_2015.11.26.3074855"


def _break(folder: Path, change: str) -> tuple[str, str, str]:
    """Apply one bad edit; return (file, location, reason) of the expected skip."""
    if change == "trigger outside":
        edit_json(folder / "text_only_event.json", lambda d: d[0]["golden-event-mentions"][0]["trigger"].update(end=99))
        return "text_only_event.json", "[0].golden-event-mentions[0].trigger", reasons.OFFSET_OUTSIDE
    if change == "unknown type":
        edit_json(
            folder / "text_multimedia_event.json",
            lambda d: d[1]["golden-event-mentions"][0].update(event_type="Life:Marry"),
        )
        return "text_multimedia_event.json", "[1].golden-event-mentions[0].event_type", reasons.UNKNOWN_EVENT_TYPE
    if change == "words not a list":
        edit_json(folder / "text_only_event.json", lambda d: d[2].update(words="a b c"))
        return "text_only_event.json", "[2].words", reasons.WRONG_TYPE
    if change == "x2 < x1":
        key = "VOA_EN_NW_2015.11.26.3074855_1"
        edit_json(folder / "image_multimedia_event.json", lambda d: d[key]["role"]["Person"][0].__setitem__(3, 100))
        return "image_multimedia_event.json", f"'{key}'.role.Person[0]", reasons.BAD_BOX
    if change == "unknown image role":
        key = "VOA_EN_NW_2015.11.26.3074855_1"
        edit_json(
            folder / "image_multimedia_event.json", lambda d: d[key]["role"].update(Destination=[["1", 1, 1, 2, 2]])
        )
        return "image_multimedia_event.json", f"'{key}'.role.Destination", reasons.UNKNOWN_ROLE
    if change == "coref columns":
        text = (folder / "crossmedia_coref.txt").read_text().split("\n")
        text[3] = text[3].replace("\t", " ", 1)
        (folder / "crossmedia_coref.txt").write_text("\n".join(text))
        return "crossmedia_coref.txt", "4", reasons.MALFORMED
    raise AssertionError(change)


@pytest.mark.parametrize(
    "change",
    [
        "trigger outside",
        "unknown type",
        "words not a list",
        "x2 < x1",
        "unknown image role",
        "coref columns",
    ],
)
def test_bad_records_are_skipped_or_fail_under_strict(m2e2_dir: Path, tmp_path: Path, change: str) -> None:
    folder = copy_release(m2e2_dir, tmp_path)
    name, location, reason = _break(folder, change)
    gold = load_m2e2(folder)
    (skip,) = gold.skipped
    assert (skip.file, skip.line_or_key, skip.reason) == (str(folder / name), location, reason)
    with pytest.raises(SourceError) as raised:
        load_m2e2(folder, strict=True)
    assert str(raised.value).startswith(f"{folder / name}:{location}: {reason}")


@pytest.mark.parametrize(
    "name",
    ["text_only_event.json", "text_multimedia_event.json", "image_only_event.json", "image_multimedia_event.json"],
)
def test_a_json_file_that_does_not_parse_is_an_error_even_without_strict(
    m2e2_dir: Path, tmp_path: Path, name: str
) -> None:
    # A truncated text_only_event.json once built "fine" with "malformed input: 1" and all of its sentences gone.
    folder = copy_release(m2e2_dir, tmp_path)
    text = (folder / name).read_text()
    cut = text[: len(text) // 2]
    (folder / name).write_text(cut)
    line = cut.count("\n") + 1
    for strict in (False, True):
        with pytest.raises(UserError) as raised:
            load_m2e2(folder, strict=strict)
        assert str(raised.value).startswith(f"{folder / name}:{line}: invalid JSON: ")
    with pytest.raises(UserError, match="must parse as a whole"):
        SOURCES["m2e2"](folder)
    # Valid JSON of the wrong shape loses the file just the same.
    (folder / name).write_text("[]" if name.startswith("image") else "{}")
    expected = "object keyed by image id, found an array" if name.startswith("image") else "array of sentences"
    with pytest.raises(UserError, match=f"{name}: expected a JSON {expected}"):
        load_m2e2(folder)


def test_a_non_utf8_coref_line_is_one_skipped_line(m2e2_dir: Path, tmp_path: Path) -> None:
    folder = copy_release(m2e2_dir, tmp_path)
    lines = (folder / "crossmedia_coref.txt").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"\t", b"\t\xff", 1)
    (folder / "crossmedia_coref.txt").write_bytes(b"\n".join(lines))
    gold = load_m2e2(folder)
    assert len(gold.coref) == 11
    (skip,) = gold.skipped
    assert (skip.file, skip.line_or_key, skip.reason) == (str(folder / "crossmedia_coref.txt"), "3", reasons.NOT_UTF8)
    with pytest.raises(SourceError, match=r"crossmedia_coref\.txt:3: not UTF-8 text: invalid start byte"):
        load_m2e2(folder, strict=True)


def test_images_checked_against_their_files(m2e2_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "image"
    images.mkdir()
    Image.new("RGB", (2000, 1700), "white").save(images / "VOA_EN_NW_2015.11.26.3074855_1.jpg")
    Image.new("RGB", (300, 200), "white").save(images / "VOA_EN_NW_2016.02.10.3184811_3.jpg")
    gold = load_m2e2(m2e2_dir, images_dir=images)
    ((image_id, width, height),) = [(image.id, image.width, image.height) for image in gold.images]
    assert (image_id, width, height) == ("VOA_EN_NW_2015.11.26.3074855_1", 2000, 1700)
    skipped = {skip.line_or_key: skip.reason for skip in gold.skipped}
    assert len(skipped) == 21
    assert skipped["'VOA_EN_NW_2016.02.10.3184811_3'.role.Entity[0]"] == reasons.BOX_OUTSIDE
    assert list(skipped.values()).count(reasons.IMAGE_NOT_FOUND) == 20
    # The coreference check uses the annotations, whatever happened to the images.
    assert len(gold.inconsistencies) == 1


def test_missing_files_are_named(m2e2_dir: Path, tmp_path: Path) -> None:
    folder = copy_release(m2e2_dir, tmp_path)
    (folder / "crossmedia_coref.txt").unlink()
    with pytest.raises(UserError, match=r"missing M2E2 file.*crossmedia_coref\.txt"):
        load_m2e2(folder)
