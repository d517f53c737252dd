"""shards.py on real tar files: round trip, determinism, atomicity, verification, and the no-pickle policy."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import pickle
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from rmpl_ds import __version__, shards
from rmpl_ds.errors import UserError
from rmpl_ds.images import encode_image
from rmpl_ds.shards import (
    MANIFEST_NAME,
    ShardSample,
    ShardSet,
    decode_member,
    describe_shards,
    verify_shards,
    write_shards,
)

SOURCE = "demo"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _sample(number: int) -> ShardSample:
    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    record = {"id": number, "words": ["a", "b"][: number % 3], "label": f"type-{number % 4}"}
    members = {
        "json": json.dumps(record).encode(),
        "png": encode_image(Image.fromarray(pixels)),
        "npy": _npy(np.arange(number + 1, dtype=np.int32)),
    }
    if number % 2:
        members["txt"] = f"sentence {number} – ü".encode()
    return ShardSample(f"s{number:04d}", members)


def _samples(count: int) -> list[ShardSample]:
    return [_sample(number) for number in range(count)]


def _hash_tree(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ShardSample]]:
    """A 10-sample set in shards of 4, 4 and 2; tests that damage it copy it first."""
    samples = _samples(10)
    out_dir = tmp_path_factory.mktemp("built") / "demo"
    write_shards(samples, out_dir, source=SOURCE, shard_size=4, extra_manifest={"counts": {"train": 10}})
    return out_dir, samples


def _copy(directory: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in directory.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def _index(directory: Path, shard: str) -> list:
    return json.loads((directory / shard.replace(".tar", ".idx.json")).read_text())["samples"]


# ---------------------------------------------------------------------------------------------------------------------
# Round trip, layout, determinism


def test_round_trip_random_access(built: tuple[Path, list[ShardSample]]) -> None:
    out_dir, samples = built
    shard_set = ShardSet.open(out_dir)
    assert len(shard_set) == 10 and shard_set.source == SOURCE
    order = list(range(10))
    random.Random(0).shuffle(order)
    for i in order:
        assert shard_set.key(i) == samples[i].key
        raw = shard_set.read_raw(i)
        assert raw == samples[i].members
        assert list(raw) == sorted(samples[i].members)  # members come back in written (sorted) order
        decoded = shard_set.read(i)
        assert decoded["json"] == json.loads(samples[i].members["json"])
        assert np.array_equal(decoded["npy"], np.arange(i + 1, dtype=np.int32))
        image = decoded["png"]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(samples[i].members["png"]))))
        if i % 2:
            assert decoded["txt"] == f"sentence {i} – ü"
    assert shard_set.key(-1) == samples[-1].key
    with pytest.raises(IndexError):
        shard_set.read_raw(10)
    shard_set.close()


def test_shard_size_manifest_and_describe(built: tuple[Path, list[ShardSample]]) -> None:
    out_dir, _ = built
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "demo-000000.idx.json",
        "demo-000000.tar",
        "demo-000001.idx.json",
        "demo-000001.tar",
        "demo-000002.idx.json",
        "demo-000002.tar",
        MANIFEST_NAME,
    ]
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert manifest["source"] == SOURCE and manifest["converter_version"] == __version__
    assert manifest["samples"] == 10 and manifest["counts"] == {"train": 10}
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 4, 2]
    for shard in manifest["shards"]:
        tar_bytes = (out_dir / shard["file"]).read_bytes()
        assert shard["bytes"] == len(tar_bytes)
        assert shard["sha256"] == hashlib.sha256(tar_bytes).hexdigest()
    # No absolute paths or build directory names anywhere in what we wrote.
    for path in out_dir.iterdir():
        if path.suffix == ".json":
            assert str(out_dir.parent) not in path.read_text()
    description = describe_shards(out_dir)
    assert "source demo, 10 samples in 3 shards" in description and "train: 10" in description


def test_tar_headers_are_fixed(built: tuple[Path, list[ShardSample]]) -> None:
    out_dir, _ = built
    with tarfile.open(out_dir / "demo-000000.tar") as tar:
        members = tar.getmembers()
    assert [member.name for member in members[:3]] == ["s0000.json", "s0000.npy", "s0000.png"]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == (
            0,
            0,
            0,
            "",
            "",
            0o644,
        )


def test_rebuild_is_byte_identical(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir, samples = built
    again = tmp_path / "demo"
    manifest = write_shards(iter(samples), again, source=SOURCE, shard_size=4, extra_manifest={"counts": {"train": 10}})
    assert _hash_tree(again) == _hash_tree(out_dir)
    assert manifest == json.loads((again / MANIFEST_NAME).read_text())
    # Rebuilding over an existing set replaces it with identical bytes, and leaves no temporary directory.
    write_shards(samples, again, source=SOURCE, shard_size=4, extra_manifest={"counts": {"train": 10}})
    assert _hash_tree(again) == _hash_tree(out_dir)
    assert [path.name for path in tmp_path.iterdir()] == ["demo"]
    assert ShardSet.open(again).fingerprint() == ShardSet.open(out_dir).fingerprint()


def test_fingerprint_changes_with_content(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir, samples = built
    changed = [*samples[:-1], ShardSample(samples[-1].key, {"json": b"{}"})]
    write_shards(changed, tmp_path / "changed", source=SOURCE, shard_size=4)
    write_shards(samples[:-1], tmp_path / "shorter", source=SOURCE, shard_size=4)
    fingerprints = {ShardSet.open(path).fingerprint() for path in (out_dir, tmp_path / "changed", tmp_path / "shorter")}
    assert len(fingerprints) == 3


def test_webdataset_reads_the_same_samples(built: tuple[Path, list[ShardSample]]) -> None:
    out_dir, samples = built
    urls = [str(path) for path in sorted(out_dir.glob("*.tar"))]
    # No .decode(): raw bytes only, so webdataset's pickle-capable default decoders are never involved.
    seen = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [sample["__key__"] for sample in seen] == [sample.key for sample in samples]
    for got, expected in zip(seen, samples, strict=True):
        assert {ext: data for ext, data in got.items() if not ext.startswith("__")} == expected.members


def _read_inherited(shard_set: ShardSet, queue: multiprocessing.Queue) -> None:
    queue.put((shard_set.read_raw(5), len(shard_set._fds)))


def test_descriptors_are_per_process(built: tuple[Path, list[ShardSample]]) -> None:
    out_dir, samples = built
    shard_set = ShardSet.open(out_dir)
    assert shard_set.read_raw(0) == samples[0].members  # the parent caches descriptors for shards 0 and 1
    assert shard_set.read_raw(5) == samples[5].members
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_inherited, args=(shard_set, queue))
    child.start()
    members, open_in_child = queue.get(timeout=30)
    child.join(timeout=30)
    assert members == samples[5].members
    assert open_in_child == 1  # the child dropped the parent's two cached descriptors and opened its own
    restored = pickle.loads(pickle.dumps(shard_set))  # our own object, as a spawned DataLoader worker gets it
    assert restored._fds == {} and restored.read_raw(5) == samples[5].members
    shard_set.close()
    restored.close()


# ---------------------------------------------------------------------------------------------------------------------
# Atomicity


def _failing_after(count: int, samples: list[ShardSample]) -> Iterator[ShardSample]:
    yield from samples[:count]
    raise RuntimeError("converter crashed")


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="converter crashed"):
        write_shards(_failing_after(7, _samples(10)), out_dir, source=SOURCE, shard_size=3)  # 2 shards done
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_existing_set(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir = _copy(built[0], tmp_path / "demo")
    before = _hash_tree(out_dir)
    with pytest.raises(RuntimeError, match="converter crashed"):
        write_shards(_failing_after(9, _samples(10)), out_dir, source=SOURCE, shard_size=4)
    bad = [*_samples(3), ShardSample("s0099", {"pyd": b"x"})]
    with pytest.raises(UserError):
        write_shards(bad, out_dir, source=SOURCE, shard_size=2)
    assert _hash_tree(out_dir) == before
    assert [path.name for path in tmp_path.iterdir()] == ["demo"]


def test_refuses_to_replace_a_directory_that_is_not_a_shard_set(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="refusing to replace"):
        write_shards(_samples(1), precious, source=SOURCE)
    assert (precious / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------------------------------------------------------------
# Validation at write time


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (ShardSample("k1", {"pyd": b"x"}), r"'k1', member k1\.pyd: pickle-bearing"),
        (ShardSample("k1", {"json.pyd": b"x"}), r"member k1\.json\.pyd: pickle-bearing"),
        (ShardSample("k1", {"pyd.gz": b"x"}), r"member k1\.pyd\.gz: pickle-bearing"),
        (ShardSample("k1", {"pth": b"x"}), r"member k1\.pth: pickle-bearing"),
        (ShardSample("k1", {"exe": b"x"}), r"member k1\.exe: extension \.exe is not in the whitelist"),
        (ShardSample("k1", {"JPG": b"x"}), r"member k1\.JPG: extension 'JPG' must be lower-case"),
        (ShardSample("k1", {"json": b"{not json"}), r"member k1\.json: .*invalid JSON"),
        (ShardSample("k1", {"txt": b"\xff\xfe\xfa"}), r"member k1\.txt: .*not UTF-8"),
        (ShardSample("k1", {"npy": b"\x80\x04pickle"}), r"member k1\.npy: .*not an \.npy array"),
        (ShardSample("a.b", {"json": b"{}"}), r"'a\.b'.*contains a dot"),
        (ShardSample("a/b", {"json": b"{}"}), r"'a/b'.*slash"),
        (ShardSample("..", {"json": b"{}"}), r"'\.\.'.*contains a dot"),
        (ShardSample("", {"json": b"{}"}), "non-empty"),
        (ShardSample("__meta__", {"json": b"{}"}), "metadata"),
        (ShardSample("k" * 98, {"json": b"{}"}), "longer than 100 bytes"),
        (ShardSample("k1", {}), "no members"),
    ],
)
def test_write_rejects_bad_samples(sample: ShardSample, expected: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=expected):
        write_shards([_sample(0), sample], tmp_path / "out", source=SOURCE)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_object_npy_and_duplicate_keys(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"member k1\.npy: .*pickle-bearing \.npy"):
        write_shards([ShardSample("k1", {"npy": buffer.getvalue()})], tmp_path / "out", source=SOURCE)
    with pytest.raises(UserError, match="'s0001': duplicate key"):
        write_shards([_sample(1), _sample(2), _sample(1)], tmp_path / "out", source=SOURCE)
    with pytest.raises(UserError, match="source name"):
        write_shards([_sample(1)], tmp_path / "out", source="../evil")
    assert list(tmp_path.iterdir()) == []


def test_json_members_are_capped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shards, "JSON_MAX_BYTES", 16)
    with pytest.raises(UserError, match=r"member k1\.json: .*exceeds the 16-byte cap"):
        write_shards([ShardSample("k1", {"json": b'{"long": "enough to exceed"}'})], tmp_path / "out", source=SOURCE)
    with pytest.raises(UserError, match="exceeds the 16-byte cap"):
        decode_member("json", b"[" + b"1," * 20 + b"1]")


# ---------------------------------------------------------------------------------------------------------------------
# Verification of damaged sets


def test_verify_clean_set(built: tuple[Path, list[ShardSample]]) -> None:
    assert verify_shards(built[0]) == []


def test_verify_catches_truncation(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir = _copy(built[0], tmp_path / "demo")
    opened_before = ShardSet.open(out_dir)
    tar_path = out_dir / "demo-000001.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:3000])
    with pytest.raises(UserError, match=r"demo-000001\.tar: member s0007\.json: read 0 of \d+ bytes"):
        opened_before.read_raw(7)
    opened_before.close()
    problems = verify_shards(out_dir)
    assert problems and all(problem.startswith("demo-000001.tar: ") for problem in problems)
    assert any("truncated" in problem for problem in problems)
    with pytest.raises(UserError, match=r"demo-000001\.tar: 3000 bytes but manifest\.json says"):
        ShardSet.open(out_dir)


def test_verify_names_the_member_with_a_flipped_byte(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir = _copy(built[0], tmp_path / "demo")
    tar_path = out_dir / "demo-000001.tar"
    key, extents = _index(out_dir, "demo-000001.tar")[2]
    offset, size, _ = extents["png"]
    data = bytearray(tar_path.read_bytes())
    data[offset + size // 2] ^= 0x01
    tar_path.write_bytes(bytes(data))
    problems = verify_shards(out_dir)
    assert key == "s0006"
    assert problems == [
        "demo-000001.tar: sha256 differs from manifest.json",
        "demo-000001.tar: member s0006.png: bytes differ from when the shard was written",
    ]


def test_verify_catches_a_corrupt_header(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir = _copy(built[0], tmp_path / "demo")
    tar_path = out_dir / "demo-000000.tar"
    offset = _index(out_dir, "demo-000000.tar")[1][1]["json"][0] - 512  # the header of s0001.json
    data = bytearray(tar_path.read_bytes())
    data[offset + 3] ^= 0x20  # inside the name field: the header checksum no longer matches
    tar_path.write_bytes(bytes(data))
    problems = verify_shards(out_dir)
    assert f"demo-000000.tar: unreadable tar header at byte {offset}: corrupt, members after it are lost" in problems
    assert "demo-000000.tar: member s0001.json: listed in the index but missing from the tar" in problems


def test_verify_catches_missing_and_extra_members(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir = _copy(built[0], tmp_path / "demo")
    tar_path = out_dir / "demo-000000.tar"
    with tarfile.open(tar_path) as tar:
        kept = [(member, tar.extractfile(member).read()) for member in tar.getmembers() if member.name != "s0002.npy"]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in kept:
            tar.addfile(member, io.BytesIO(data))
        extra = tarfile.TarInfo("s0003.webp")
        extra.size = 5
        tar.addfile(extra, io.BytesIO(b"hello"))
    problems = verify_shards(out_dir)
    assert "demo-000000.tar: member s0002.npy: listed in the index but missing from the tar" in problems
    assert "demo-000000.tar: member s0003.webp: in the tar but not in the index" in problems
    assert "demo-000000.tar: sha256 differs from manifest.json" in problems


def test_verify_and_open_catch_index_and_manifest_damage(built: tuple[Path, list[ShardSample]], tmp_path: Path) -> None:
    out_dir = _copy(built[0], tmp_path / "demo")
    (out_dir / "stray-000000.tar").write_bytes(b"")
    index_path = out_dir / "demo-000002.idx.json"
    index_path.write_text(index_path.read_text().replace('"s0008"', '"s0000"'))
    problems = verify_shards(out_dir)
    assert "stray-000000.tar: not listed in manifest.json" in problems
    assert "demo-000002.idx.json: sha256 differs from manifest.json; the index was modified or corrupted" in problems
    with pytest.raises(UserError, match=r"demo-000002\.idx\.json: sha256 differs"):
        ShardSet.open(out_dir)
    (out_dir / MANIFEST_NAME).unlink()
    assert verify_shards(out_dir) == [f"{out_dir / MANIFEST_NAME}: missing; {out_dir} is not a complete shard set"]
    with pytest.raises(UserError, match=r"manifest\.json: missing"):
        ShardSet.open(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Hostile shard sets, forged by hand (a consistent manifest and index, so only the members are at fault)


class _Payload:
    """Unpickling this creates a file: proof that something unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (open, (str(self.sentinel), "w"))


def _forge_shard_set(directory: Path, members: list[tuple[str, bytes]]) -> None:
    """Write a tar with exactly ``members``, and the index and manifest that faithfully describe it."""
    directory.mkdir()
    tar_path = directory / "evil-000000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples: list[list] = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            # webdataset's own grouping rule: key = path up to the first dot of the basename.
            key, extension = webdataset.tariterators.base_plus_ext(member.name)
            if not samples or samples[-1][0] != key:
                samples.append([key, {}])
            samples[-1][1][extension] = [member.offset_data, member.size, "0" * 32]
    tar_bytes = tar_path.read_bytes()
    tar_sha = hashlib.sha256(tar_bytes).hexdigest()
    index = {"format": "rmpl-ds-shard-index", "format_version": 1, "file": tar_path.name, "bytes": len(tar_bytes)}
    index_text = json.dumps({**index, "sha256": tar_sha, "samples": samples})
    (directory / "evil-000000.idx.json").write_text(index_text)
    manifest = {
        "format": "rmpl-ds-shards",
        "format_version": 1,
        "source": "evil",
        "converter_version": __version__,
        "samples": len(samples),
        "shard_size": 1000,
        "shards": [
            {
                "file": tar_path.name,
                "index": "evil-000000.idx.json",
                "index_sha256": hashlib.sha256(index_text.encode()).hexdigest(),
                "sha256": tar_sha,
                "samples": len(samples),
                "bytes": len(tar_bytes),
            }
        ],
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


HOSTILE_MEMBERS = [
    ("x.pyd", "pickle-bearing member (.pyd)"),
    ("x.pkl", "pickle-bearing member (.pkl)"),
    ("x.pth", "pickle-bearing member (.pth)"),
    ("x.json.pyd", "pickle-bearing member (.pyd)"),
    ("x.pyd.gz", "pickle-bearing member (.pyd)"),
    ("../evil.json", "member path with '..' refused"),
    ("/abs.json", "absolute member path refused"),
]


@pytest.mark.parametrize(("name", "reason"), HOSTILE_MEMBERS)
def test_hostile_members_are_rejected_at_verify_and_open(name: str, reason: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(sentinel))
    directory = tmp_path / "evil"
    _forge_shard_set(directory, [("good.json", b'{"ok": true}'), (name, payload)])
    problems = verify_shards(directory)
    assert f"evil-000000.tar: member {name}: {reason}" in "\n".join(problems)
    with pytest.raises(UserError) as caught:
        ShardSet.open(directory)
    message = str(caught.value)
    assert "evil-000000.idx.json" in message
    assert "pickle-bearing" in message if "pickle" in reason else "contains a dot, slash" in message
    assert not sentinel.exists()


def test_nothing_is_ever_unpickled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sentinel = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(sentinel))
    object_npy = io.BytesIO()
    np.save(object_npy, np.array([_Payload(sentinel)], dtype=object), allow_pickle=True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)

    out_dir = tmp_path / "demo"
    write_shards(_samples(4), out_dir, source=SOURCE, shard_size=3)
    assert verify_shards(out_dir) == []
    with ShardSet.open(out_dir) as shard_set:
        for i in range(len(shard_set)):
            assert isinstance(shard_set.read(i)["npy"], np.ndarray)

    with pytest.raises(UserError, match="pickle-bearing"):
        write_shards([ShardSample("k", {"pyd": payload})], tmp_path / "bad", source=SOURCE)
    with pytest.raises(UserError, match=r"pickle-bearing \.npy"):
        write_shards([ShardSample("k", {"npy": object_npy.getvalue()})], tmp_path / "bad", source=SOURCE)
    with pytest.raises(UserError, match=r"pickle-bearing \.npy"):
        decode_member("npy", object_npy.getvalue())
    with pytest.raises(UserError, match="pickle-bearing"):
        decode_member("pyd", payload)

    hostile = tmp_path / "evil"
    _forge_shard_set(hostile, [("a.pyd", payload), ("b.npy", object_npy.getvalue()), ("c.pickle", payload)])
    problems = "\n".join(verify_shards(hostile))
    assert "member a.pyd: pickle-bearing" in problems and "member c.pickle: pickle-bearing" in problems
    assert "member b.npy: pickle-bearing .npy" in problems
    with pytest.raises(UserError, match="pickle-bearing"):
        ShardSet.open(hostile)
    assert not sentinel.exists()
