"""The chat source: every layout (OpenAI messages, ShareGPT with and without LLaMA-Factory's dataset_info.json,
LLaVA) from every container (JSON, JSON Lines, Parquet with image bytes, a datasets save_to_disk directory) written
here, converted to records that keep every turn and image, then to shards whose image members hold the normalized
pixels; bad rows skipped with file, row and reason, or exit 2 under --strict with nothing written."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmpl_ds.cli import main
from rmpl_ds.records import ChatPart, ChatRecord, ChatTurn
from rmpl_ds.shards import ShardSet, verify_shards
from rmpl_ds.sources import SOURCES
from rmpl_ds.sources.base import IMAGE_NOT_FOUND, MALFORMED, UNREADABLE_IMAGE, WRONG_TYPE, SourceError
from rmpl_ds.sources.chat import (
    ASSISTANT_IMAGE,
    EMPTY_TURN,
    IMAGE_COUNT,
    MAX_IMAGES,
    REMOTE_IMAGE,
    SPECIAL_TOKEN,
    TOO_MANY_IMAGES,
    TURN_ORDER,
    UNKNOWN_LAYOUT,
    UNSUPPORTED_PART,
    UNSUPPORTED_ROLE,
    VIDEO,
    convert,
)

RED, BLUE, GREEN = (200, 20, 20), (20, 40, 210), (30, 180, 60)


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (48, 32), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """``img/red.jpg`` (48x32 JPEG) and ``img/blue.png`` (20x20 PNG) under tmp_path."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.jpg").write_bytes(image_bytes(RED, fmt="JPEG"))
    (tmp_path / "img" / "blue.png").write_bytes(image_bytes(BLUE, (20, 20)))
    return tmp_path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def texts(record: ChatRecord) -> list[tuple[str, str]]:
    """(role, the turn's text with each image written <i>) of every turn."""
    return [
        (turn.role, "".join(part.text if part.image is None else f"<{part.image}>" for part in turn.parts))
        for turn in record.turns
    ]


def build(tmp_path: Path, input_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "shards"
    return main(["shards", "build", "--source", "chat", "--input", str(input_path), "--out", str(out), *extra]), out


def mean_colour(image: Image.Image) -> tuple[int, ...]:
    return tuple(round(v) for v in np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0))


# --------------------------------------------------------------------------------------------- each layout


def test_openai_messages_jsonl_with_parts_listed_inline_and_data_url_images(pictures: Path) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(image_bytes(GREEN)).decode()
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "Red."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "And these?"},
                        {"type": "image", "image": "img/blue.png"},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Blue, green."}]},
            ],
            "images": ["img/red.jpg"],
        },
        # LLaMA-Factory's messages layout: <image> placeholders in a string content take the listed images.
        {
            "messages": [
                {"role": "user", "content": "<image>Which?"},
                {"role": "assistant", "content": "Red."},
            ],
            "images": ["img/red.jpg"],
        },
        {"messages": [{"role": "user", "content": "Text only."}, {"role": "assistant", "content": "Fine."}]},
    ]
    conversion = convert(write_jsonl(pictures / "chat_train.jsonl", rows), strict=True)
    assert conversion.format == "openai" and not conversion.skipped
    first, second, third = conversion.records
    assert first == ChatRecord(
        "chat_train.jsonl-1",
        "chat",
        "train",
        (
            ChatTurn("system", (ChatPart("Answer in one word."),)),
            ChatTurn("user", (ChatPart(image=0), ChatPart("Colour?"))),
            ChatTurn("assistant", (ChatPart("Red."),)),
            ChatTurn("user", (ChatPart("And these?"), ChatPart(image=1), ChatPart(image=2))),
            ChatTurn("assistant", (ChatPart("Blue, green."),)),
        ),
        ("img/red.jpg", "img/blue.png", "chat_train.jsonl:1:messages[3].content[2].image_url.url"),
    )
    assert texts(second) == [("user", "<0>Which?"), ("assistant", "Red.")] and second.images == ("img/red.jpg",)
    assert third.images == () and conversion.counts["by_assistant_turns"] == {"1": 2, "2": 1}
    members = conversion.image_members(first)
    assert [extension for extension, _ in members] == ["jpg", "png", "png"]  # a PNG original stays PNG
    colours = [mean_colour(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in members]
    assert np.allclose(colours, [RED, BLUE, GREEN], atol=3)


def test_sharegpt_json_without_dataset_info(pictures: Path) -> None:
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A red box."},
                {"from": "human", "value": "Compare with <image>."},
                {"from": "gpt", "value": "That one is blue."},
            ],
            "system": "Be brief.",
            "images": ["img/red.jpg", "img/blue.png"],
        },
        {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}]},
    ]
    path = pictures / "sharegpt.json"
    path.write_text(json.dumps(rows))
    conversion = convert(path, strict=True)
    assert conversion.format == "sharegpt"
    first, second = conversion.records
    assert texts(first) == [
        ("system", "Be brief."),
        ("user", "<0>\nWhat is it?"),
        ("assistant", "A red box."),
        ("user", "Compare with <1>."),
        ("assistant", "That one is blue."),
    ]
    assert first.images == ("img/red.jpg", "img/blue.png") and first.split == "all"
    assert texts(second) == [("user", "Hi"), ("assistant", "Hello.")]


def test_llama_factory_dataset_info_columns_and_tags(pictures: Path) -> None:
    """mllm_demo's layout: `messages` with role/content tags, the images column declared; an alpaca entry and a hub
    entry are listed as ignored, with the reason."""
    data = [
        {
            "messages": [
                {"role": "user", "content": "<image>Who is there?"},
                {"role": "assistant", "content": "Nobody."},
            ],
            "pictures": ["img/blue.png"],
        }
    ]
    (pictures / "mllm_demo.json").write_text(json.dumps(data))
    (pictures / "alpaca_en_demo.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    info = {
        "mllm_demo": {
            "file_name": "mllm_demo.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "pictures"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "hub": {"hf_hub_url": "someone/data"},
    }
    (pictures / "dataset_info.json").write_text(json.dumps(info))
    conversion = convert(pictures, strict=True)
    (record,) = conversion.records
    assert texts(record) == [("user", "<0>Who is there?"), ("assistant", "Nobody.")]
    assert record.images == ("img/blue.png",) and record.id == "mllm_demo.json-0"
    assert conversion.counts["ignored_entries"] == {
        "alpaca_en_demo": "formatting alpaca is not a conversation",
        "hub": "no local file_name",
    }


def test_llava_json_with_an_images_root(tmp_path: Path, pictures: Path) -> None:
    data = [
        {
            "id": "000000033471",
            "image": "red.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the box?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Is it large?"},
                {"from": "gpt", "value": "No, small."},
            ],
        }
    ]
    path = tmp_path / "llava_v1_5_mix.json"
    path.write_text(json.dumps(data))
    conversion = convert(path, images_dir=pictures / "img", strict=True)  # relative to --images
    (record,) = conversion.records
    assert conversion.format == "llava" and record.images == ("red.jpg",)
    assert [turn.role for turn in record.turns] == ["user", "assistant", "user", "assistant"]
    # Without --images, paths resolve against the input's folder, where red.jpg is not.
    (skip,) = convert(path).skipped
    assert (skip.line_or_key, skip.reason) == ("[0].image", IMAGE_NOT_FOUND)


def test_parquet_with_image_bytes_in_a_column(tmp_path: Path) -> None:
    """A plain binary column and the datasets Image struct ({bytes, path}); bytes are read again from the file
    when the shards are written, and the shard's image members hold the original pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = [
        json.dumps([{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": colour}])
        for colour in ("Red.", "Blue.", "Green.")
    ]
    # Two columns of different shapes need two files: raw bytes, and the datasets struct.
    raw = pa.table(
        {
            "conversations": pa.array([json.loads(c) for c in conversations[:1]]),
            "images": pa.array([[image_bytes(RED, fmt="JPEG")]], type=pa.list_(pa.binary())),
        }
    )
    struct = pa.table(
        {
            "conversations": pa.array([json.loads(c) for c in conversations[1:]]),
            "images": pa.array(
                [[{"bytes": image_bytes(BLUE), "path": "blue.png"}], [{"bytes": image_bytes(GREEN), "path": None}]],
                type=pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ),
        }
    )
    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(raw, folder / "a_train.parquet")
    pq.write_table(struct, folder / "b_train.parquet", row_group_size=1)  # two row groups: read back per group
    conversion = convert(folder, strict=True)
    assert [record.images for record in conversion.records] == [
        ("a_train.parquet:0:images[0]",),
        ("blue.png",),
        ("b_train.parquet:1:images[0]",),
    ]
    assert [texts(record)[1][1] for record in conversion.records] == ["Red.", "Blue.", "Green."]
    code, out = build(tmp_path, folder, "--strict")
    assert code == 0 and verify_shards(out) == []
    with ShardSet.open(out) as shards:
        decoded = [shards.read(index) for index in range(len(shards))]
    assert [sorted(sample) for sample in decoded] == [["0.jpg", "json"], ["0.png", "json"], ["0.png", "json"]]
    colours = [mean_colour(next(v for k, v in sample.items() if k != "json")) for sample in decoded]
    assert np.allclose(colours, [RED, BLUE, GREEN], atol=3)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    """What the datasets library writes (Arrow files + JSON), read with pyarrow: a Dataset with an Image feature
    and a DatasetDict whose splits become the records' splits."""
    import datasets

    messages = [
        [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Text only?"}, {"role": "assistant", "content": "Yes."}],
    ]
    dataset = datasets.Dataset.from_dict(
        {"messages": messages, "images": [[{"bytes": image_bytes(BLUE), "path": None}], []]}
    ).cast_column("images", datasets.List(datasets.Image()))
    dataset.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": dataset, "validation": dataset.select([1])}).save_to_disk(str(tmp_path / "dict"))

    one = convert(tmp_path / "one", strict=True)
    assert [record.id for record in one.records] == [
        "one/data-00000-of-00001.arrow-0",
        "one/data-00000-of-00001.arrow-1",
    ]
    assert one.records[0].images == ("one/data-00000-of-00001.arrow:0:images[0]",) and one.records[1].images == ()
    ((extension, data),) = one.image_members(one.records[0])
    assert extension == "png" and mean_colour(Image.open(io.BytesIO(data)).convert("RGB")) == BLUE

    split = convert(tmp_path / "dict", strict=True)
    assert [(record.split, texts(record)[0][1]) for record in split.records] == [
        ("train", "<0>Colour?"),
        ("train", "Text only?"),
        ("val", "Text only?"),
    ]
    code, out = build(tmp_path, tmp_path / "dict", "--strict")
    assert code == 0 and ShardSet.open(out).manifest["counts"]["by_split"] == {"train": 2, "val": 1}


# --------------------------------------------------------------------------------------------- shards


def test_shards_are_byte_identical_on_rebuild_and_plain_webdataset_groups_the_images(
    tmp_path: Path, pictures: Path
) -> None:
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image><image>Two?"},
                {"from": "gpt", "value": "Yes."},
            ],
            "images": ["img/red.jpg", "img/blue.png"],
        }
    ]
    path = write_jsonl(pictures / "two.jsonl", rows)
    out1, out2 = tmp_path / "one", tmp_path / "two"
    for out in (out1, out2):
        assert main(["shards", "build", "--source", "chat", "--input", str(path), "--out", str(out)]) == 0
    files = sorted(p.name for p in out1.iterdir())
    assert files == sorted(p.name for p in out2.iterdir())
    assert all((out1 / name).read_bytes() == (out2 / name).read_bytes() for name in files)
    with tarfile.open(out1 / "chat-000000.tar") as tar:
        assert tar.getnames() == ["0000000-two_jsonl-1.0.jpg", "0000000-two_jsonl-1.1.png", "0000000-two_jsonl-1.json"]
    import webdataset

    (sample,) = list(webdataset.WebDataset(str(out1 / "chat-000000.tar"), shardshuffle=False))
    assert sorted(key for key in sample if not key.startswith("__")) == ["0.jpg", "1.png", "json"]


def test_inspect_shows_turns_images_and_token_lengths(
    tmp_path: Path, pictures: Path, tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}],
            "images": ["img/red.jpg"],
        },
        {
            "messages": [
                {"role": "user", "content": "One"},
                {"role": "assistant", "content": "Two"},
                {"role": "user", "content": "Three"},
                {"role": "assistant", "content": "Four " * 40},
            ]
        },
    ]
    code, out = build(tmp_path, write_jsonl(pictures / "x.jsonl", rows))
    assert code == 0
    model = tiny_model_dir("qwen2-vl")
    from rmpl_ds import chat, records
    from rmpl_ds.backbones import get_adapter

    bundle = get_adapter("qwen2-vl").load_processor(model)
    with ShardSet.open(out) as shards:
        measured = []
        for index in range(2):
            item = {**shards.read(index), "key": shards.key(index)}
            record = records.from_json(item["json"])
            encoded = bundle.encode(chat.render(record, chat.sample_images(item, record)), max_seq_len=4096)
            measured.append(encoded["length"])
    assert measured[0] != measured[1]
    capsys.readouterr()
    assert main(["shards", "inspect", str(out), "--model", str(model), "--max-seq-len", str(min(measured))]) == 0
    printed = capsys.readouterr().out
    assert "assistant turns per conversation: 1: 1, 2: 1 (mean 1.50, max 2)" in printed
    assert "images per conversation: 0: 1, 1: 1 (mean 0.50, max 1)" in printed
    assert f"min {min(measured)}, median {sum(measured) / 2:g}" in printed and f"max {max(measured)}" in printed
    assert f"longer than max_seq_len {min(measured)}: 1 (50.0%" in printed
    # --model on an RMPL set is refused (no task to measure), as bad input.
    rmpl = tmp_path / "rmpl"
    (tmp_path / "ace.json").write_text(
        json.dumps([{"sentence": "a", "words": ["a"], "golden-entity-mentions": [], "golden-event-mentions": []}])
    )
    assert main(["shards", "build", "--source", "ace", "--input", str(tmp_path / "ace.json"), "--out", str(rmpl)]) == 0
    assert main(["shards", "inspect", str(rmpl), "--model", str(model)]) == 2
    assert "token lengths are measured for chat sets" in capsys.readouterr().err


def test_no_images_does_not_apply_to_chat(tmp_path: Path, pictures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(
        pictures / "x.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    code, out = build(tmp_path, path, "--no-images")
    assert code == 2 and not out.exists()
    assert "--no-images: does not apply to --source chat" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- bad rows

GOOD = {
    "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
    "images": ["img/red.jpg"],
}


def turns_of(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


# (row, reason, where the skip points inside the row)
BAD_ROWS = [
    (["not", "an", "object"], WRONG_TYPE, ""),
    ({"text": "no conversation"}, UNKNOWN_LAYOUT, ""),
    (turns_of(("user", "a"), ("tool", "b")), UNSUPPORTED_ROLE, "messages[1].role"),
    (turns_of(("user", "a"), ("user", "b")), TURN_ORDER, ""),
    (turns_of(("assistant", "a"), ("user", "b")), TURN_ORDER, ""),
    (turns_of(("user", "a"), ("assistant", "b"), ("user", "c")), TURN_ORDER, ""),
    (turns_of(("user", "a"), ("assistant", " ")), EMPTY_TURN, "messages[1]"),
    (turns_of(("user", "a <|im_start|>"), ("assistant", "b")), SPECIAL_TOKEN, "messages[0]"),
    (turns_of(("user", "a"), ("assistant", "b <IMG_CONTEXT>")), SPECIAL_TOKEN, "messages[1]"),
    ({**GOOD, "images": []}, IMAGE_COUNT, "images"),
    ({**GOOD, "images": ["img/red.jpg", "img/red.jpg"]}, IMAGE_COUNT, "images"),
    ({**GOOD, "images": ["img/missing.jpg"]}, IMAGE_NOT_FOUND, "images[0]"),
    ({**GOOD, "images": ["img/broken.jpg"]}, UNREADABLE_IMAGE, "images[0]"),
    ({**GOOD, "images": ["https://example.com/a.jpg"]}, REMOTE_IMAGE, "images[0]"),
    ({**GOOD, "images": ["data:image/png;base64,@@@"]}, UNREADABLE_IMAGE, "images[0]"),
    ({**GOOD, "videos": ["a.mp4"]}, VIDEO, "videos"),
    (
        {
            **turns_of(("user", "<image>" * (MAX_IMAGES + 1)), ("assistant", "b")),
            "images": ["img/red.jpg"] * (MAX_IMAGES + 1),
        },
        TOO_MANY_IMAGES,
        "",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "b"}]},
        UNSUPPORTED_PART,
        "messages[0].content[0].type",
    ),
    (
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>b"}],
            "images": ["img/red.jpg"],
        },
        ASSISTANT_IMAGE,
        "messages[1]",
    ),
    (
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]},
        WRONG_TYPE,
        "conversations[0].value",
    ),
    ({"conversations": [{"from": "function_call", "value": "{}"}]}, UNSUPPORTED_ROLE, "conversations[0].from"),
    ({"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}, IMAGE_COUNT, "images"),
]


def test_bad_rows_are_skipped_with_file_row_and_reason(pictures: Path) -> None:
    """The same bad rows in JSON (key paths), JSON Lines (line numbers) and Parquet (row numbers): each is skipped
    with its reason, the good rows around them convert."""
    (pictures / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rows = [GOOD, *(row for row, _, _ in BAD_ROWS), GOOD]
    json_path = pictures / "rows.json"
    json_path.write_text(json.dumps(rows))
    jsonl_path = write_jsonl(pictures / "rows.jsonl", rows)
    for path, where in ((json_path, "json"), (jsonl_path, "jsonl")):
        conversion = convert(path)
        assert len(conversion.records) == 2
        assert [(skip.file, skip.reason) for skip in conversion.skipped] == [(str(path), r) for _, r, _ in BAD_ROWS]
        for number, (skip, (_, _, inside)) in enumerate(zip(conversion.skipped, BAD_ROWS, strict=True), start=1):
            if where == "json":
                assert skip.line_or_key == f"[{number}]" + (f".{inside}" if inside else "")
            else:
                assert skip.line_or_key == str(number + 1)
                assert skip.detail.startswith(f"{inside}: " if inside else "")
    # The last rows as Parquet: the same reasons, located by row number.
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_rows = [GOOD, {**GOOD, "images": []}, {**GOOD, "images": ["img/missing.jpg"]}, turns_of(("user", "a"))]
    table = pa.Table.from_pylist(
        [{"messages": row["messages"], "images": row.get("images", [])} for row in parquet_rows]
    )
    pq.write_table(table, pictures / "rows.parquet")
    conversion = convert(pictures / "rows.parquet")
    assert [(skip.line_or_key, skip.reason) for skip in conversion.skipped] == [
        ("row 1", IMAGE_COUNT),
        ("row 2", IMAGE_NOT_FOUND),
        ("row 3", TURN_ORDER),
    ]
    assert len(conversion.records) == 1


def test_a_line_that_is_not_json_is_one_skipped_row(pictures: Path) -> None:
    path = pictures / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n" + json.dumps(GOOD) + "\n")
    conversion = convert(path)
    assert len(conversion.records) == 2
    ((skip),) = conversion.skipped
    assert (skip.line_or_key, skip.reason) == ("2", MALFORMED)


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet", "arrow"])
def test_strict_stops_at_the_first_bad_row_with_exit_2_and_writes_nothing(
    tmp_path: Path, pictures: Path, container: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [GOOD, turns_of(("user", "a"), ("user", "b")), {**GOOD, "images": ["img/missing.jpg"]}]
    if container == "json":
        path = pictures / "rows.json"
        path.write_text(json.dumps(rows))
        where = f"{path}:[1]"
    elif container == "jsonl":
        path = write_jsonl(pictures / "rows.jsonl", rows)
        where = f"{path}:2"
    else:
        import datasets

        dataset = datasets.Dataset.from_list(
            [{"messages": row["messages"], "images": row.get("images", [])} for row in rows]
        )
        if container == "parquet":
            path = pictures / "rows.parquet"
            dataset.to_parquet(str(path))
            where = f"{path}:row 1"
        else:
            dataset.save_to_disk(str(pictures / "saved"))
            path = pictures / "saved"
            where = f"{path / 'data-00000-of-00001.arrow'}:row 1"
    with pytest.raises(SourceError) as raised:
        convert(path, images_dir=pictures, strict=True)
    assert str(raised.value).startswith(f"{where}: {TURN_ORDER}: ")
    code, out = build(tmp_path, path, "--strict", "--images", str(pictures))
    assert code == 2 and not out.exists()
    error = capsys.readouterr().err
    assert f"{where}: {TURN_ORDER}" in error and "Traceback" not in error
    # Without --strict the set is written, the bad rows counted by reason.
    code, out = build(tmp_path, path, "--images", str(pictures))
    assert code == 0
    skipped = ShardSet.open(out).manifest["skipped"]
    assert skipped["total"] == 2 and set(skipped["by_reason"]) == {TURN_ORDER, IMAGE_NOT_FOUND}


def test_whole_file_problems_are_errors_even_without_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "object.json": (b'{"messages": []}', "expected a JSON array of conversations, found an object"),
        "truncated.json": (b'[{"messages": [', "invalid JSON"),
        "not.parquet": (b"PAR1 this is not parquet", "not a readable parquet file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        code, out = build(tmp_path, path)
        assert code == 2 and not out.exists(), name
        assert message in capsys.readouterr().err, name
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _ = build(tmp_path, empty)
    assert code == 2 and "no chat files" in capsys.readouterr().err


def test_registered_as_a_source() -> None:
    assert SOURCES["chat"] is convert


def test_the_readmes_example_rows_convert_as_it_says(tmp_path: Path) -> None:
    """The first example row of each layout in README "Your own data" converts to the conversation it shows."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(("| OpenAI", "| ShareGPT", "| LLaVA"))]
    assert len(rows) == 3
    for number, line in enumerate(rows):
        example = json.loads(re.search(r"`(\{.*?\})`", line).group(1))
        folder = tmp_path / f"layout{number}"
        for name in [*example.get("images", []), *([example["image"]] if "image" in example else [])]:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(image_bytes(RED, fmt="JPEG"))
        conversion = convert(write_jsonl(folder / "train.jsonl", [example]))
        assert conversion.skipped == [], line
        (record,) = conversion.records
        assert texts(record)[-2:] == [("user", "<0>What happens?" if number != 2 else "<0>\nWhat happens?"),
                                      ("assistant", "A protest.")], line  # fmt: skip
        assert conversion.format == ("openai", "sharegpt", "llava")[number]
