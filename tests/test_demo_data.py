"""The synthetic demo set: real raw formats, deterministic per seed, read back by every converter, and learnable.

"Learnable" is tested directly: a rule that only looks at the cues (the trigger word for text; the colour of the
large shape for images) recovers every event type, and the role glyphs sit inside the argument boxes, so a
model trained on the demo has something to learn that an untrained one does not know.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmpl_ds.cli import main
from rmpl_ds.errors import UserError
from rmpl_ds.ontology import EVENT_TYPES, imsitu_verb_mappings
from rmpl_ds.sources import SOURCES, Conversion, load_m2e2
from rmpl_ds.sources.demo import MIN_SIZE, ROLE_GLYPHS, SUMMARY_NAME, TRIGGERS, TYPE_GLYPHS, write_demo

SIZE = 40
# (source, input, images) under the demo directory, as in demo.build_commands.
LAYOUT = {
    "ace": ("ace", None),
    "swig": ("swig/SWiG_jsons", "swig/images_512"),
    "imsitu": ("imsitu", "swig/images_512"),
    "mnre": ("mnre/mnre_txt", "mnre/img_org"),
    "m2e2": ("m2e2/m2e2_annotations", "m2e2/image"),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "raw"
    write_demo(out, seed=0, size=SIZE)
    return out


def convert(demo: Path, source: str) -> Conversion:
    relative, images = LAYOUT[source]
    return SOURCES[source](demo / relative, images_dir=demo / images if images else None, strict=True)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_is_the_real_one(demo: Path) -> None:
    assert (demo / "mnre" / "mnre_txt" / "mnre_val .txt").is_file()
    assert sorted(p.name for p in (demo / "swig" / "SWiG_jsons").iterdir()) == [
        "dev.json",
        "imsitu_space.json",
        "test.json",
        "train.json",
    ]
    annotations = demo / "m2e2" / "m2e2_annotations"
    for name in ("text_only_event.json", "crossmedia_coref.txt"):
        assert not (annotations / name).read_bytes().endswith(b"\n")  # like the release
    first = json.loads((annotations / "text_only_event.json").read_text())[0]
    assert list(first)[:4] == ["sentence_id", "sentence_start", "sentence_end", "sentence"]
    # The real quirk: words end with "." which the sentence string lacks; its index is sentence_end.
    assert first["words"][-1] == "." and not first["sentence"].endswith(".")
    assert first["index"][-1] == [str(first["sentence_end"])] * 2
    line = (demo / "mnre" / "mnre_txt" / "mnre_train.txt").read_text().splitlines()[0]
    assert line.startswith("{'token': [")  # a Python dict repr, not JSON


def test_summary_counts_for_seed_0(demo: Path) -> None:
    counts = json.loads((demo / SUMMARY_NAME).read_text())["counts"]
    assert (counts["ace"]["sentences"], counts["ace"]["events"], counts["ace"]["negatives"]) == (40, 31, 9)
    assert (counts["swig"]["images"], counts["swig"]["events"], counts["swig"]["boxes"]) == (40, 36, 74)
    assert (counts["mnre"]["lines"], counts["mnre"]["images"], counts["mnre"]["by_relation"]["None"]) == (40, 29, 19)
    m2e2 = counts["m2e2"]
    assert (m2e2["documents"], m2e2["sentences"], m2e2["text_events"], m2e2["overlapping_sentences"]) == (5, 38, 27, 2)
    assert (m2e2["images"], m2e2["image_events"], m2e2["image_boxes"], m2e2["coref_links"]) == (14, 11, 35, 14)


def test_every_converter_reads_it_back_with_the_summary_counts(demo: Path) -> None:
    counts = json.loads((demo / SUMMARY_NAME).read_text())["counts"]

    ace = convert(demo, "ace")
    assert ace.format == "nlpcl-lab" and ace.skipped == []
    assert ace.counts["records"] == counts["ace"]["sentences"]
    assert ace.counts["by_split"] == counts["ace"]["by_split"]
    assert ace.counts["by_event_type"] == counts["ace"]["by_event_type"]
    assert ace.counts["negatives"] == counts["ace"]["negatives"]
    assert ace.counts["dropped_event_types"] == counts["ace"]["dropped_event_types"]

    for source in ("swig", "imsitu"):
        situations = convert(demo, source)
        assert situations.format == source and situations.skipped == []
        assert situations.counts["by_event_type"] == counts["swig"]["by_event_type"]
        assert situations.counts["negatives"] == counts["swig"]["negatives"]
        assert situations.counts["unknown_noun_ids"] == 0
    assert convert(demo, "swig").counts["boxes"] == counts["swig"]["boxes"]
    assert {(r.width, r.height) for r in convert(demo, "imsitu").records} == {
        (r.width, r.height) for r in convert(demo, "swig").records
    }

    mnre = convert(demo, "mnre")
    assert mnre.format == "mnre-v2" and mnre.skipped == []
    assert mnre.counts["by_relation"] == counts["mnre"]["by_relation"]
    assert mnre.counts["by_split"] == counts["mnre"]["by_split"]

    gold = load_m2e2(demo / LAYOUT["m2e2"][0], images_dir=demo / LAYOUT["m2e2"][1], strict=True)
    found = gold.counts()
    expected = counts["m2e2"]
    assert found["sentences"] == expected["sentences"]
    assert found["text_events"] == expected["text_events"]
    assert found["overlapping_sentences"] == expected["overlapping_sentences"]
    assert (found["image_events"], found["image_boxes"]) == (expected["image_events"], expected["image_boxes"])
    assert found["coref_links"] == expected["coref_links"] and found["inconsistencies"] == 0
    assert all(600 <= min(image.width, image.height) <= 900 for image in gold.images)


def test_same_seed_same_bytes_other_seed_other_data(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_demo(again, seed=0, size=SIZE)
    assert tree_digest(again) == tree_digest(demo)
    other = tmp_path / "other"
    write_demo(other, seed=1, size=MIN_SIZE)
    assert tree_digest(other)["ace/train.json"] != tree_digest(demo)["ace/train.json"]


def test_text_cue_a_trigger_word_names_the_type(demo: Path) -> None:
    owner = {word: event_type for event_type, words in TRIGGERS.items() for word in words}
    assert len(owner) == sum(len(words) for words in TRIGGERS.values())  # no word serves two types
    sentences = [*convert(demo, "ace").records, *load_m2e2(demo / LAYOUT["m2e2"][0]).sentences]
    for sentence in sentences:
        predicted = sorted(owner[token] for token in sentence.tokens if token in owner)
        assert predicted == sorted(event.event_type for event in sentence.events), sentence.tokens
        for event in sentence.events:
            assert sentence.tokens[event.trigger.start] in TRIGGERS[event.event_type]


def _pixels(path: Path, reduce: int = 1) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    return np.asarray(image.reduce(reduce) if reduce > 1 else image).astype(np.int16)


def _type_from_colour(path: Path) -> str | None:
    """The cue-only rule: the type colour covering the most pixels (at least 2% of the image), else no event."""
    pixels = _pixels(path, reduce=4)  # a quarter of the resolution is plenty for a large shape
    coverage = {
        event_type: int((np.abs(pixels - np.array(colour)).max(axis=2) < 40).sum())
        for event_type, (_, colour) in TYPE_GLYPHS.items()
    }
    best = max(coverage, key=coverage.__getitem__)
    return best if coverage[best] > 0.02 * pixels.shape[0] * pixels.shape[1] else None


def test_image_cue_the_shape_colour_names_the_type_and_glyphs_sit_in_the_boxes(demo: Path) -> None:
    mappings = imsitu_verb_mappings()
    swig = convert(demo, "swig")
    gold = load_m2e2(demo / LAYOUT["m2e2"][0])
    annotated = {image.image: image.events[0].event_type for image in gold.images}
    checked = 0
    for record in swig.records:
        expected = record.events[0].event_type if record.events else None
        assert _type_from_colour(demo / "swig" / "images_512" / record.image) == expected
        assert (record.events != ()) == (record.events[0].verb in mappings if record.events else False)
        checked += 1
    for path in sorted((demo / "m2e2" / "image").iterdir()):
        assert _type_from_colour(path) == annotated.get(path.name)
        checked += 1
    assert (
        checked == 54 and len(set(annotated.values()) | {r.events[0].event_type for r in swig.records if r.events}) == 8
    )

    # Each grounded argument's box holds its role's glyph colour at the centre (all glyph shapes cover it).
    for record in [*swig.records, *gold.images]:
        folder = demo / ("swig/images_512" if record.source == "swig" else "m2e2/image")
        pixels = _pixels(folder / record.image)
        for event in record.events:
            for argument in event.arguments:
                if argument.box is None or argument.flag == "0":
                    continue
                x1, y1, x2, y2 = argument.box
                centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
                assert np.abs(centre - np.array(ROLE_GLYPHS[argument.role][1])).max() < 40, (record.id, argument)


def test_all_event_types_in_every_event_source(demo: Path) -> None:
    assert set(convert(demo, "ace").counts["by_event_type"]) == set(EVENT_TYPES)
    assert set(convert(demo, "swig").counts["by_event_type"]) == set(EVENT_TYPES)


def test_cli_writes_refuses_and_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo-data", "--out", str(out), "--seed", "3", "--size", str(MIN_SIZE)]) == 0
    printed = capsys.readouterr().out
    assert "rmpl-ds shards build --source m2e2" in printed and f"--input {out}/ace" in printed
    before = tree_digest(out)
    assert main(["demo-data", "--out", str(out), "--seed", "3", "--size", str(MIN_SIZE)]) == 0  # a demo is replaced
    assert tree_digest(out) == before

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    assert main(["demo-data", "--out", str(precious)]) == 2
    assert "not a demo directory" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "keep me"
    assert main(["demo-data", "--out", str(tmp_path / "tiny"), "--size", "3"]) == 2
    assert not (tmp_path / "tiny").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo", "precious"]  # no temporary left over
    with pytest.raises(UserError):
        write_demo(precious)
