"""`rmpl-ds shards build / verify / inspect` end to end: real fixtures, the demo set, bad input, broken shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rmpl_ds.cli import main
from rmpl_ds.records import ImageRecord, RelationPair, from_json
from rmpl_ds.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, ShardSet
from rmpl_ds.sources.demo import write_demo

DEMO_SIZE = 16
DEMO_SOURCES = {
    "ace": ("ace", None),
    "swig": ("swig/SWiG_jsons", "swig/images_512"),
    "imsitu": ("imsitu", "swig/images_512"),
    "mnre": ("mnre/mnre_txt", "mnre/img_org"),
    "m2e2": ("m2e2/m2e2_annotations", "m2e2/image"),
}


def build(source: str, input_path: Path, out: Path, images: Path | None = None, *extra: str) -> int:
    argv = ["shards", "build", "--source", source, "--input", str(input_path), "--out", str(out), *extra]
    if images is not None:
        argv += ["--images", str(images)]
    return main(argv)


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "demo"
    write_demo(out, seed=0, size=DEMO_SIZE)
    return out


@pytest.fixture(scope="module")
def demo_shards(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards = tmp_path_factory.mktemp("shards")
    for source, (relative, images) in DEMO_SOURCES.items():
        assert build(source, demo / relative, shards / source, demo / images if images else None) == 0
    return shards


def test_ace_fixtures_build_byte_identical_shards(real_fixtures: Path, tmp_path: Path) -> None:
    raw = tmp_path / "ace"
    raw.mkdir()
    shutil.copy(real_fixtures / "ace2005" / "JMEE" / "sample.json", raw / "train.json")
    shutil.copy(real_fixtures / "ace2005" / "nlpcl-lab_ace2005-preprocessing" / "sample.json", raw / "dev.json")
    shutil.copy(real_fixtures / "ace2005" / "oneie_format" / "example.oneie.json", raw / "test.oneie.json")
    assert build("ace", raw, tmp_path / "first", None, "--shard-size", "2") == 0
    assert build("ace", raw, tmp_path / "second", None, "--shard-size", "2") == 0
    assert files(tmp_path / "first") == files(tmp_path / "second")
    written = manifest(tmp_path / "first")
    assert written["detected_format"] == "jmee+nlpcl-lab+oneie"
    assert written["samples"] == 3 and [shard["samples"] for shard in written["shards"]] == [2, 1]
    assert written["counts"]["by_split"] == {"dev": 1, "test": 1, "train": 1}
    assert written["counts"]["by_event_type"] == {"Life:Die": 1}
    assert written["skipped"] == {"total": 0, "by_reason": {}}
    assert written["converter"] == "rmpl_ds.sources.ace.convert"
    with ShardSet.open(tmp_path / "first") as shard_set:
        keys = [shard_set.key(i) for i in range(len(shard_set))]
        records = [from_json(shard_set.read(i)["json"]) for i in range(len(shard_set))]
    assert keys == ["0000000-dev-0", "0000001-AFP_ENG_20030427_0118-1", "0000002-train-0"]
    assert [record.split for record in records] == ["dev", "test", "train"]


def test_m2e2_fixture_counts_reach_the_manifest(real_fixtures: Path, tmp_path: Path) -> None:
    # M2E2 publishes no images: blank stand-ins for two images (as large as their boxes need), one too small for
    # its boxes, none for the other 19.
    images = tmp_path / "image"
    images.mkdir()
    Image.new("L", (1783, 1631), 128).save(images / "VOA_EN_NW_2015.11.26.3074855_1.jpg")
    Image.new("RGB", (1444, 1344), "white").save(images / "VOA_EN_NW_2016.12.14.3635600_5.jpg")
    Image.new("RGB", (500, 500), "white").save(images / "VOA_EN_NW_2017.04.05.3797975_4.jpg")
    assert build("m2e2", real_fixtures / "m2e2", tmp_path / "shards", images) == 0
    written = manifest(tmp_path / "shards")
    assert written["samples"] == 28 + 2 + 12
    assert written["counts"]["m2e2"]["sentences"] == 28 and written["counts"]["m2e2"]["image_boxes"] == 6
    assert len(written["counts"]["inconsistencies"]) == 1
    by_reason = written["skipped"]["by_reason"]
    assert {reason: entry["count"] for reason, entry in by_reason.items()} == {
        "box outside the image": 1,
        "image not found": 19,
    }
    with ShardSet.open(tmp_path / "shards") as shard_set:
        records = [from_json(shard_set.read(i)["json"]) for i in range(len(shard_set))]
        first_image = next(i for i, record in enumerate(records) if isinstance(record, ImageRecord))
        members = shard_set.read(first_image)
    assert set(members) == {"json", "jpg"} and members["jpg"].size == (1783, 1631)
    assert [record.kind for record in records].count("crossmedia_link") == 12


def test_demo_builds_for_every_source(demo: Path, demo_shards: Path) -> None:
    summary = json.loads((demo / "demo_summary.json").read_text())["counts"]
    expected = {
        "ace": summary["ace"]["sentences"],
        "swig": summary["swig"]["images"],
        "imsitu": summary["swig"]["images"],
        "mnre": summary["mnre"]["lines"],
        "m2e2": summary["m2e2"]["sentences"] + summary["m2e2"]["image_events"] + summary["m2e2"]["coref_links"],
    }
    assert expected == {"ace": 16, "swig": 16, "imsitu": 16, "mnre": 16, "m2e2": 14 + 4 + 6}
    for source, samples in expected.items():
        written = manifest(demo_shards / source)
        assert (written["source"], written["samples"], written["skipped"]["total"]) == (source, samples, 0)
        assert main(["shards", "verify", str(demo_shards / source)]) == 0
        with ShardSet.open(demo_shards / source) as shard_set:
            for i in range(len(shard_set)):
                members = shard_set.read(i)
                record = from_json(members["json"])
                if isinstance(record, ImageRecord):
                    assert members["jpg"].size == (record.width, record.height)
                elif isinstance(record, RelationPair):
                    assert members["jpg"].mode == "RGB"
                else:
                    assert set(members) == {"json"}


def test_image_shards_rebuild_byte_identical(demo: Path, demo_shards: Path, tmp_path: Path) -> None:
    assert build("swig", demo / "swig" / "SWiG_jsons", tmp_path / "swig", demo / "swig" / "images_512") == 0
    assert files(tmp_path / "swig") == files(demo_shards / "swig")


def test_inspect_prints_the_counts(demo_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "inspect", str(demo_shards / "swig")]) == 0
    printed = capsys.readouterr().out
    assert "source swig, 16 samples in 1 shards" in printed
    assert "by_event_type:" in printed and "detected_format: swig" in printed


def _copy(demo_shards: Path, source: str, tmp_path: Path) -> tuple[Path, str]:
    target = tmp_path / source
    shutil.copytree(demo_shards / source, target)
    return target, manifest(target)["shards"][0]["file"]


def test_verify_catches_a_truncated_tar(demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory, tar_name = _copy(demo_shards, "swig", tmp_path)
    tar = directory / tar_name
    os.truncate(tar, tar.stat().st_size // 2)
    assert main(["shards", "verify", str(directory)]) == 2
    printed = capsys.readouterr().out
    assert f"{tar_name}: " in printed and "truncated" in printed


def test_verify_catches_a_flipped_byte_and_names_the_member(
    demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, tar_name = _copy(demo_shards, "mnre", tmp_path)
    index = json.loads((directory / tar_name.replace(".tar", ".idx.json")).read_text())
    key, members = index["samples"][3]
    offset, size, _ = members["jpg"]
    tar = directory / tar_name
    data = bytearray(tar.read_bytes())
    data[offset + size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["shards", "verify", str(directory)]) == 2
    printed = capsys.readouterr().out
    assert f"{tar_name}: sha256 differs" in printed
    assert f"{tar_name}: member {key}.jpg: bytes differ" in printed


BAD_ACE = [
    {"words": ["Rebels", "attacked", "."], "golden-event-mentions": []},
    {
        "words": ["Rebels", "attacked", "."],
        "golden-event-mentions": [
            {"event_type": "Conflict:Attack", "trigger": {"start": 1, "end": 9, "text": "attacked"}, "arguments": []}
        ],
    },
]


def test_strict_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.json").write_text(json.dumps(BAD_ACE))
    out = tmp_path / "out" / "ace"
    assert build("ace", raw, out, None, "--strict") == 2
    error = capsys.readouterr().err
    assert f"{raw / 'train.json'}:[1].golden-event-mentions[0].trigger: offset outside the sentence" in error
    assert "Traceback" not in error
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))

    assert build("ace", raw, out) == 0  # without --strict the bad sentence is skipped and counted
    skipped = manifest(out)["skipped"]
    assert skipped["total"] == 1
    (entry,) = skipped["by_reason"].values()
    assert entry["count"] == 1 and entry["examples"][0].startswith(f"{raw / 'train.json'}:[1].golden-event-mentions")


MNRE_LINE = (
    "{'token': ['Ann', 'met', 'Bob'], 'h': {'name': 'Ann', 'pos': [0, 1]}, 't': {'name': 'Bob', 'pos': [2, 3]}, "
    "'img_id': 'NAME', 'relation': '/per/per/peer'}"
)


def test_a_build_that_converts_nothing_writes_nothing_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to write a manifest with no shard and exit 1, leaving a set that `verify` called ok and that the
    # pipeline would reuse; now the reasons go to the terminal and an existing set at --out is kept as it was.
    images = tmp_path / "img_org"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.jpg")
    good = tmp_path / "good" / "mnre_test.txt"
    good.parent.mkdir()
    good.write_text(MNRE_LINE.replace("NAME", "a.jpg") + "\n")
    out = tmp_path / "out"
    assert build("mnre", good, out, images) == 0
    before = files(out)
    capsys.readouterr()
    raw = tmp_path / "mnre_test.txt"
    raw.write_text("{'token': \n" + MNRE_LINE.replace("/peer", "/friend").replace("NAME", "a.jpg") + "\n")
    assert build("mnre", raw, out, images) == 2
    error = capsys.readouterr().err
    assert f"{raw}: no record to write, so {out} was not written" in error and "Traceback" not in error
    assert "skipped 2 (malformed input: 1, unknown relation label: 1)" in error
    assert f"{raw}:1: malformed input: not a Python literal" in error
    assert files(out) == before
    assert build("mnre", raw, tmp_path / "new", images) == 2
    assert not (tmp_path / "new").exists()


def test_verify_refuses_an_empty_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What `shards build` used to leave behind when every record was skipped.
    (tmp_path / "empty").mkdir()
    empty_manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": "mnre", "samples": 0}
    (tmp_path / "empty" / MANIFEST_NAME).write_text(json.dumps({**empty_manifest, "shard_size": 1000, "shards": []}))
    assert main(["shards", "verify", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / 'empty'}: the shard set holds no sample" in captured.err and "Traceback" not in captured.err
    assert "ok" not in captured.out


def test_a_wrong_or_empty_images_directory_is_an_error(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # MNRE with the SWiG images: every record skipped as "image not found" used to give exit 1 and an empty set;
    # M2E2 with an empty directory silently dropped every image record.
    wrong = demo / "swig" / "images_512"
    assert build("mnre", demo / "mnre" / "mnre_txt", tmp_path / "mnre", wrong) == 2
    error = capsys.readouterr().err
    assert f"--images {wrong}: none of the 16 images the records refer to is there" in error
    assert "image not found: " in error and not (tmp_path / "mnre").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build("m2e2", demo / "m2e2" / "m2e2_annotations", tmp_path / "m2e2", empty) == 2
    assert f"--images {empty}: empty directory" in capsys.readouterr().err
    assert build("m2e2", demo / "m2e2" / "m2e2_annotations", tmp_path / "m2e2", tmp_path / "absent") == 2
    assert f"--images {tmp_path / 'absent'}: not a directory" in capsys.readouterr().err
    assert not (tmp_path / "m2e2").exists()


def test_m2e2_text_part_without_images(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((demo / "demo_summary.json").read_text())["counts"]["m2e2"]
    out = tmp_path / "m2e2"
    assert build("m2e2", demo / "m2e2" / "m2e2_annotations", out, None, "--no-images") == 0
    printed = capsys.readouterr().out
    links, images = summary["coref_links"], summary["image_events"]
    assert f"{out}: left out (--no-images): {links} crossmedia_link, {images} image_record" in printed
    written = manifest(out)
    assert written["samples"] == summary["sentences"]
    assert written["left_out"] == {
        "because": "--no-images",
        "records": {"crossmedia_link": links, "image_record": images},
    }
    assert written["counts"]["by_kind"] == {"text_sentence": summary["sentences"]}
    assert "boxes" not in written["counts"] and written["counts"]["m2e2"]["image_events"] == images
    assert main(["shards", "verify", str(out)]) == 0
    with ShardSet.open(out) as shard_set:
        assert all(set(shard_set.read_raw(i)) == {"json"} for i in range(len(shard_set)))

    for source, (relative, _) in DEMO_SOURCES.items():
        if source in ("m2e2", "ace"):
            continue
        assert build(source, demo / relative, tmp_path / source, None, "--no-images") == 2
        assert f"--no-images: every {source} record needs its image" in capsys.readouterr().err
        assert not (tmp_path / source).exists()
    with pytest.raises(SystemExit) as raised:  # argparse: the two options exclude each other
        build("m2e2", demo / "m2e2" / "m2e2_annotations", out, demo / "m2e2" / "image", "--no-images")
    assert raised.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_manifest_is_byte_identical_across_builds_with_bad_lines(demo: Path, tmp_path: Path) -> None:
    # Skip reasons once held an AST node's memory address and a set in hash order, so manifest.json differed
    # between two builds of the same input (the tars did not). Two processes with different hash seeds.
    raw = tmp_path / "mnre_txt"
    shutil.copytree(demo / "mnre" / "mnre_txt", raw)
    images = tmp_path / "img_org"
    shutil.copytree(demo / "mnre" / "img_org", images)
    unreadable = sorted((images / "train").iterdir())[0]
    unreadable.write_bytes(b"\xff\xd8 not a JPEG")
    bad_lines = [
        b"__import__('os').system('true')",  # code: literal_eval's message named an AST node at an address
        b"{'token': ['a', 'b'], 'h': ",  # cut short
        b"{'x', 'y', 'z', 'w'}",  # a set, not a dict
        MNRE_LINE.replace("'token': [", "'token': {'p', 'q', 'r'}, 'x': [").encode(),  # a set where a list belongs
        MNRE_LINE.replace("NAME", "twitter_absent.jpg").encode(),  # image not found
        MNRE_LINE.replace("Ann", "Ann\xe9").encode("latin-1"),  # not UTF-8
    ]
    train = raw / "mnre_train.txt"
    train.write_bytes(train.read_bytes() + b"\n".join(bad_lines) + b"\n")
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out-{seed}"
        command = [sys.executable, "-m", "rmpl_ds", "shards", "build", "--source", "mnre", "--input", str(raw)]
        command += ["--images", str(images), "--out", str(out)]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        outputs.append(files(out))
    assert outputs[0] == outputs[1]
    by_reason = json.loads(outputs[0]["manifest.json"])["skipped"]["by_reason"]
    assert {reason: entry["count"] for reason, entry in by_reason.items()} == {
        "image not found": 1,
        "malformed input": 3,
        "not UTF-8 text": 1,
        "unreadable image": (raw / "mnre_train.txt").read_text(errors="replace").count(unreadable.name),
        "wrong field type": 1,
    }


def test_missing_and_unreadable_images(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "img_org"
    shutil.copytree(demo / "mnre" / "img_org", images)
    first, second = sorted((images / "train").iterdir())[:2]
    first.unlink()
    second.write_bytes(b"\xff\xd8 this is not a JPEG")
    assert build("mnre", demo / "mnre" / "mnre_txt", tmp_path / "out", images) == 0
    by_reason = manifest(tmp_path / "out")["skipped"]["by_reason"]
    assert set(by_reason) == {"image not found", "unreadable image"}
    assert by_reason["image not found"]["examples"][0].endswith(f"image not found: {images / first.name}")

    assert build("mnre", demo / "mnre" / "mnre_txt", tmp_path / "strict", images, "--strict") == 2
    assert "image not found" in capsys.readouterr().err and not (tmp_path / "strict").exists()
    assert build("swig", demo / "swig" / "SWiG_jsons", tmp_path / "no-images") == 2
    assert "--images DIR is required" in capsys.readouterr().err


def test_image_modes_and_exif_orientation_are_normalized_on_build(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    Image.new("P", (40, 30), 3).save(images / "palette.png")
    Image.new("LA", (40, 30), (90, 128)).save(images / "grey_alpha.png")
    Image.new("I;16", (40, 30), 40000).save(images / "sixteen.png")
    rotated = Image.new("RGB", (40, 30), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the upright image is 30 x 40
    rotated.save(images / "rotated.jpg", exif=exif)
    line = (
        "{'token': ['Ann', 'met', 'Bob'], 'h': {'name': 'Ann', 'pos': [0, 1]}, 't': {'name': 'Bob', 'pos': [2, 3]}, "
        "'img_id': 'NAME', 'relation': '/per/per/peer'}"
    )
    names = ["cmyk.jpg", "palette.png", "grey_alpha.png", "sixteen.png", "rotated.jpg"]
    raw = tmp_path / "mnre_train.txt"
    raw.write_text("".join(line.replace("NAME", name) + "\n" for name in names))
    assert build("mnre", raw, tmp_path / "out", images) == 0
    with ShardSet.open(tmp_path / "out") as shard_set:
        decoded = [shard_set.read(i) for i in range(len(shard_set))]
    assert [sorted(members) for members in decoded] == [["jpg", "json"], *[["json", "png"]] * 3, ["jpg", "json"]]
    pictures = [members.get("jpg") or members.get("png") for members in decoded]
    assert all(picture.mode == "RGB" for picture in pictures)
    assert pictures[-1].size == (30, 40)
    assert pictures[2].getpixel((0, 0)) == pictures[2].getpixel((39, 29))
