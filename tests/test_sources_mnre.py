"""MNRE converter on the real v2 and v1 samples and on bad lines (shared/fixtures/real/mnre, counted by hand).

v2: mnre_train.txt has 30 lines covering all 23 labels (8 None), "mnre_val .txt" 12 lines (10 None, 2 peer),
mnre_test.txt 12 lines (5 None). v1: 8 lines per file, 8 lowercase ``none`` in all, one ``/per/misc/creat``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from rmpl_ds.ontology import RELATION_LABELS
from rmpl_ds.records import EntityMention
from rmpl_ds.sources import SOURCES, SourceError
from rmpl_ds.sources import base as reasons
from rmpl_ds.sources.mnre import ENTITY_NAME_MISMATCH


@pytest.fixture(scope="session")
def mnre_dir(real_fixtures: Path) -> Path:
    return real_fixtures / "mnre"


convert = SOURCES["mnre"]

GOOD = (
    "{'token': ['RT', '@cnnsport', ':', 'Rafael', 'Nadal', 'gets', 'engaged', 'to', 'Mery', 'Perello'], "
    "'h': {'name': 'Rafael Nadal', 'pos': [3, 5]}, 't': {'name': 'Mery Perello', 'pos': [8, 10]}, "
    "'img_id': 'twitter_1.jpg', 'relation': '/per/per/couple'}"
)


def test_v2_fixture_counts_and_the_space_in_the_val_file_name(mnre_dir: Path) -> None:
    conversion = convert(mnre_dir / "mnre_txt")
    assert conversion.format == "mnre-v2" and conversion.skipped == []
    assert conversion.counts["by_split"] == {"test": 12, "train": 30, "val": 12}
    assert conversion.counts["formats"]["mnre_val .txt"] == "mnre-v2"
    by_relation = conversion.counts["by_relation"]
    assert by_relation["None"] == 23 and by_relation["/per/per/alumi"] == 1  # sic: the real spelling
    train = [record for record in conversion.records if record.split == "train"]
    assert {record.relation for record in train} == set(RELATION_LABELS)
    test_labels = {record.relation for record in conversion.records if record.split == "test"}
    assert "/per/per/alumi" not in test_labels and "/per/misc/race" not in test_labels
    first = conversion.records[0]
    assert (first.id, first.split, first.image) == ("mnre_test-1", "test", "twitter_stream_2018_10_10_13_0_2_142.jpg")
    assert first.head == EntityMention("Crocodile", 6, 7) and first.tail == EntityMention("South Wales", 9, 11)
    assert conversion.records[-1].id == "mnre_val-12"

    single = convert(mnre_dir / "mnre_txt" / "mnre_val .txt")
    assert len(single.records) == 12 and {record.split for record in single.records} == {"val"}
    positives = convert(mnre_dir / "mnre_txt", keep_negatives=False)
    assert len(positives.records) == 31 and positives.counts["negatives_dropped"] == 23


def test_lines_with_apostrophes_use_double_quotes_and_still_parse(mnre_dir: Path) -> None:
    lines = (mnre_dir / "mnre_txt" / "mnre_train.txt").read_text().splitlines()
    assert '"\'s"' in lines[2]  # the real repr switches quotes for "'s"
    record = next(record for record in convert(mnre_dir / "mnre_txt").records if record.id == "mnre_train-3")
    assert record.tokens[5] == "'s" and record.head.name == "Bill Cosby"


def test_v1_lowercase_none_and_its_own_labels(mnre_dir: Path) -> None:
    conversion = convert(mnre_dir / "Version-1_txt")
    assert conversion.format == "mnre-v1" and conversion.skipped == []
    assert conversion.counts["by_split"] == {"test": 8, "train": 8, "val": 8}
    assert conversion.counts["by_relation"]["None"] == 8
    assert conversion.counts["by_relation"]["/per/misc/creat"] == 1
    assert "none" not in conversion.counts["by_relation"]
    assert conversion.records[0].image == "175532.jpg"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{'token': ['a', 'b'], 'h': ", reasons.MALFORMED),
        ("__import__('os').system('touch PWNED')", reasons.MALFORMED),
        ("['not', 'a', 'dict']", reasons.MALFORMED),
        (GOOD.replace("'token': [", "'token': 'a string', 'x': ["), reasons.WRONG_TYPE),
        (GOOD.replace("'pos': [8, 10]", "'pos': [8, 12]"), reasons.OFFSET_OUTSIDE),
        (GOOD.replace("'pos': [8, 10]", "'pos': [8]"), reasons.WRONG_TYPE),
        (GOOD.replace("'pos': [3, 5]", "'pos': [2, 4]"), ENTITY_NAME_MISMATCH),
        (GOOD.replace("/per/per/couple", "/per/per/friend"), reasons.UNKNOWN_RELATION),
        (GOOD.replace("'/per/per/couple'", "'none'"), reasons.UNKNOWN_RELATION),  # v1 spelling in a v2 file
        (GOOD.replace("'img_id': 'twitter_1.jpg', ", ""), reasons.MISSING_FIELD),
    ],
)
def test_bad_lines_are_skipped_or_fail_under_strict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, reason: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mnre_train.txt"
    path.write_text(f"{GOOD}\n{GOOD}\n{line}\n{GOOD}\n")
    conversion = convert(path)
    assert [record.id for record in conversion.records] == ["mnre_train-1", "mnre_train-2", "mnre_train-4"]
    (skip,) = conversion.skipped
    assert (skip.file, skip.line_or_key, skip.reason) == (str(path), "3", reason)
    with pytest.raises(SourceError) as raised:
        convert(path, strict=True)
    assert str(raised.value).startswith(f"{path}:3: {reason}")
    assert not (tmp_path / "PWNED").exists()  # literal_eval never runs code


def test_images_in_flat_or_per_split_folders(tmp_path: Path) -> None:
    path = tmp_path / "mnre_val .txt"
    path.write_text(GOOD + "\n" + GOOD.replace("twitter_1.jpg", "twitter_2.jpg") + "\n")
    images = tmp_path / "img_org"
    (images / "val").mkdir(parents=True)
    Image.new("RGB", (32, 24), "red").save(images / "val" / "twitter_1.jpg")
    conversion = convert(path, images_dir=images)
    assert [record.image for record in conversion.records] == ["twitter_1.jpg"]
    (skip,) = conversion.skipped
    assert (
        skip.reason == reasons.IMAGE_NOT_FOUND and str(skip) == f"{path}:2: image not found: {images / 'twitter_2.jpg'}"
    )
    with pytest.raises(SourceError, match="image not found"):
        convert(path, images_dir=images, strict=True)


def test_a_non_utf8_line_is_one_skipped_record(tmp_path: Path) -> None:
    # One bad byte once stopped the whole build with a byte offset and no line number.
    path = tmp_path / "mnre_train.txt"
    bad = GOOD.encode().replace(b"Nadal", b"Nad\xe1l")  # Latin-1, not UTF-8
    path.write_bytes(b"\n".join([GOOD.encode(), bad, GOOD.encode(), b""]))
    conversion = convert(path)
    assert [record.id for record in conversion.records] == ["mnre_train-1", "mnre_train-3"]
    (skip,) = conversion.skipped
    assert (skip.file, skip.line_or_key, skip.reason) == (str(path), "2", reasons.NOT_UTF8)
    assert skip.detail == "invalid continuation byte: byte 0xe1 at offset 49 of the line"
    with pytest.raises(SourceError) as raised:
        convert(path, strict=True)
    assert str(raised.value) == f"{path}:2: not UTF-8 text: {skip.detail}"


def test_skip_reasons_are_the_same_text_in_every_run(tmp_path: Path) -> None:
    # literal_eval's message holds an AST node's memory address, and a set's order follows string hashing, which
    # changes between processes; the reasons name what is wrong in fixed words instead.
    path = tmp_path / "mnre_train.txt"
    lines = [
        "__import__('os').system('true')",
        "{'token': ['a', 'b'], 'h': ",
        "{'x', 'y', 'z'}",
        GOOD.replace("'token': [", "'token': {'b', 'a'}, 'x': ["),
    ]
    path.write_text("\n".join(lines) + "\n")
    assert [str(skip).removeprefix(f"{path}:") for skip in convert(path).skipped] == [
        "1: malformed input: not a Python literal: a Call at column 0",
        "2: malformed input: not a Python literal: '{' was never closed (column 1)",
        "3: malformed input: expected a dict literal, found set {'x', 'y', 'z'}",
        "4: wrong field type: token: expected list, found set {'a', 'b'}",
    ]
