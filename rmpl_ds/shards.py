"""Shard sets: uncompressed WebDataset tars with a byte-offset member index, a manifest, and safe decoding.

Layout of a shard set directory (``out_dir``)::

    manifest.json              source, format/converter versions, total samples, per-shard file/sha256/samples/bytes,
                               plus whatever the converter adds (detected format, counts, skipped records)
    {source}-000000.tar        USTAR tar; members ``{key}.{ext}``, one sample's members consecutive, exts sorted
    {source}-000000.idx.json   [key, {ext: [data_offset, size, blake2b-128 hex digest]}] in tar order,
                               with the tar's byte size and sha256
    ...

The tars are plain WebDataset shards (``webdataset.WebDataset`` iterates them); the index is what makes them
randomly accessible: :class:`ShardSet` reads a member with one ``os.pread`` at its recorded offset and never scans a
tar at read time. The per-member digest lets :func:`verify_shards` say *which* member a corrupted byte belongs to.

Security policy (notes/STREAMING.md §7.8): nothing is ever unpickled. Members are whitelisted by their last
extension (:data:`DECODERS`: json, txt/text, jpg/jpeg/png/webp, npy without pickle); a member with a pickle-bearing
extension anywhere in its name (``x.pyd``, ``x.json.pyd``, ``x.pyd.gz``), any other extension, an absolute path or
a ``..`` component is refused when writing, when verifying and when opening. We never extract to disk.

Global sample order is shard order, then member order within the shard, which is the order the samples were given
to :func:`write_shards`. Rebuilding from the same samples gives byte-identical files (fixed tar header fields, no
timestamps or absolute paths anywhere).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmpl_ds import __version__, atomic
from rmpl_ds.errors import UserError
from rmpl_ds.images import DEFAULT_MAX_PIXELS, load_image
from rmpl_ds.log import get_logger

logger = get_logger(__name__)

FORMAT_NAME = "rmpl-ds-shards"
INDEX_FORMAT_NAME = "rmpl-ds-shard-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MEMBER_DIGEST = "blake2b-128"

# A record is a few KB of JSON; 16 MiB means a converter bug or a hostile file, and json.loads on it would stall a
# DataLoader worker.
JSON_MAX_BYTES = 16 * 2**20
# USTAR keeps a member name in a 100-byte header field; longer names need GNU/PAX extension headers, which we do
# not write so that every tar reader sees exactly one header per member.
MAX_MEMBER_NAME_BYTES = 100
# Extensions that name pickle (or torch.load, which unpickles) payloads. Matched against every dot-separated part,
# so wrappers like ``x.pyd.gz`` and disguises like ``x.json.pyd`` are named for what they are.
PICKLE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth", "pt", "ckpt", "joblib", "dill"})
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})

_TAR_BLOCK = 512
_READ_CHUNK = 1 << 20
# Per shard; past this the rest are the same damage seen again (a shifted or truncated tar).
_MAX_MEMBER_PROBLEMS = 20
_NPY_MAGIC = b"\x93NUMPY"
# Extensions must already be lower case: webdataset lower-cases them when it groups members, so "JPG" and "jpg"
# would name the same member there but different ones here.
_EXTENSION_PATTERN = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_KEY_FORBIDDEN = re.compile(r"[\s./\\\x00-\x1f\x7f]")
_SOURCE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_SHARD_FILE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*-\d{6}\.tar")
_RESERVED_MANIFEST_KEYS = frozenset(
    {"format", "format_version", "source", "converter_version", "samples", "shard_size", "shards"}
)


@dataclass(frozen=True)
class ShardSample:
    """One WebDataset sample: a key and its members.

    ``key`` has no dots, slashes or whitespace and is unique within a shard set; ``members`` maps a lower-case
    extension (``"json"``, ``"jpg"``, ``"seg.npy"``) to the member's bytes. Members are written in sorted extension
    order whatever the dict order.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Names and contents: the whitelist


def _key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a WebDataset key here, or None."""
    if not isinstance(key, str) or not key:
        return f"key must be a non-empty string, got {key!r}"
    if _KEY_FORBIDDEN.search(key):
        return f"key {key!r} contains a dot, slash, backslash, whitespace or control character"
    if key.startswith("__"):
        # webdataset skips members whose names start with "__" (its metadata convention).
        return f"key {key!r} starts with '__', which webdataset treats as metadata"
    return None


def _extension_problem(extension: object) -> str | None:
    """Why a member with this extension may not be stored or read, or None when it is whitelisted."""
    if not isinstance(extension, str) or not _EXTENSION_PATTERN.fullmatch(extension):
        return f"extension {extension!r} must be lower-case letters, digits, '_' or '-' parts separated by dots"
    parts = extension.split(".")
    pickled = [part for part in parts if part in PICKLE_EXTENSIONS]
    if pickled:
        return f"pickle-bearing member (.{pickled[0]}) refused: nothing is ever unpickled"
    if parts[-1] not in DECODERS:
        return f"extension .{parts[-1]} is not in the whitelist ({', '.join(sorted(DECODERS))})"
    return None


def _member_path_problem(name: str) -> str | None:
    """Why an archive member path is unsafe or not flat, or None. Shards are flat: ``{key}.{ext}``."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "absolute member path refused"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "member path with '..' refused"
    if len(parts) > 1:
        return "member path in a subdirectory refused (shards are flat)"
    return None


def _split_member_name(name: str) -> tuple[str, str] | str:
    """``(key, extension)`` of a flat member name, or the reason it is not acceptable."""
    problem = _member_path_problem(name)
    if problem:
        return problem
    key, dot, extension = name.partition(".")
    if not dot:
        return "member has no extension"
    problem = _key_problem(key) or _extension_problem(extension)
    return problem if problem else (key, extension)


def _is_npy(data: bytes) -> bool:
    return data[: len(_NPY_MAGIC)] == _NPY_MAGIC


def _decode_json(data: bytes, name: str) -> object:
    if len(data) > JSON_MAX_BYTES:
        raise UserError(f"{name}: JSON member of {len(data)} bytes exceeds the {JSON_MAX_BYTES}-byte cap")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{name}: invalid JSON: {exc}") from None


def _decode_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: text member is not UTF-8: {exc}") from None


def _decode_npy(data: bytes, name: str) -> np.ndarray:
    # Check the magic first: np.load would also accept a zip (returning a lazy NpzFile) or sniff for a pickle.
    if not _is_npy(data):
        raise UserError(f"{name}: not an .npy array (missing the \\x93NUMPY magic)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(f"{name}: pickle-bearing .npy (object dtype) refused: nothing is ever unpickled") from None
        raise UserError(f"{name}: unreadable .npy array: {exc}") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{name}: unreadable .npy array: {exc}") from None
    return array


def _decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> object:
    return load_image(data, max_pixels=max_pixels, name=name)


# Last extension -> decoder(data, member name). The keys ARE the whitelist.
DECODERS: dict[str, Callable[[bytes, str], object]] = {
    "json": _decode_json,
    "txt": _decode_text,
    "text": _decode_text,
    "npy": _decode_npy,
    **{extension: _decode_image for extension in IMAGE_EXTENSIONS},
}


def decode_member(
    extension: str, data: bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> object:
    """Decode one member by its last extension: json -> object, txt/text -> str, jpg/jpeg/png/webp -> RGB
    ``PIL.Image`` (via :func:`rmpl_ds.images.load_image`), npy -> ``np.ndarray`` (``allow_pickle=False``).

    Raises:
        UserError: the extension is not whitelisted (pickle-bearing ones included), or the bytes do not decode
            (``ImageError`` for images); the message names ``name`` (default ``"<member>.{extension}"``).
    """
    label = name or f"<member>.{extension}"
    problem = _extension_problem(extension)
    if problem:
        raise UserError(f"{label}: {problem}")
    last = extension.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        return _decode_image(data, label, max_pixels)
    return DECODERS[last](data, label)


def _content_problem(extension: str, data: bytes, name: str) -> str | None:
    """Cheap content check at write and verify time. Images are not decoded here: the converters decode them
    with :func:`rmpl_ds.images.load_image` before writing, and decoding every image on verify would be slow."""
    last = extension.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        return None
    try:
        DECODERS[last](data, name)
    except UserError as exc:
        return str(exc)
    return None


def _member_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Tar walking (shared by write and verify, so the index is what a tar reader sees)


@dataclass(frozen=True)
class _TarMember:
    name: str
    data_offset: int
    size: int
    regular: bool


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk_tar(path: Path) -> tuple[list[_TarMember], list[str]]:
    """Every header of an uncompressed tar, in order, plus problems with the archive structure itself."""
    members: list[_TarMember] = []
    problems: list[str] = []
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.TarError as exc:
                    problems.append(f"tar unreadable after {len(members)} members ({exc}): truncated or corrupt")
                    return members, problems
                if info is None:
                    break
                members.append(_TarMember(info.name, info.offset_data, info.size, info.isreg()))
            end_of_members = tar.offset
    except tarfile.TarError as exc:
        return members, [f"not a readable uncompressed tar ({exc})"]
    # tarfile stops silently at a corrupt header after the first one, and at a clean cut between members, so check
    # that what follows the last member is the all-zero end-of-archive marker (two blocks, then zero padding).
    tail_length = file_size - end_of_members
    with open(path, "rb") as handle:
        handle.seek(end_of_members)
        tail_is_zero = all(not chunk.strip(b"\0") for chunk in iter(lambda: handle.read(_READ_CHUNK), b""))
    if not tail_is_zero:
        problems.append(f"unreadable tar header at byte {end_of_members}: corrupt, members after it are lost")
    elif tail_length < 2 * _TAR_BLOCK:
        problems.append(f"missing end-of-archive marker at byte {end_of_members}: truncated")
    for member in members:
        if member.data_offset + member.size > file_size:
            problems.append(f"member {member.name}: extends past the end of the file: truncated")
    return members, problems


def _group_members(
    members: list[_TarMember],
) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], list[str]]:
    """Group consecutive members by key as webdataset does; returns samples and per-member problems."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    problems: list[str] = []
    seen_keys: set[str] = set()
    for member in members:
        if not member.regular:
            problems.append(f"member {member.name}: not a regular file (links, directories and devices refused)")
            continue
        split = _split_member_name(member.name)
        if isinstance(split, str):
            problems.append(f"member {member.name}: {split}")
            continue
        key, extension = split
        if not samples or samples[-1][0] != key:
            if key in seen_keys:
                problems.append(f"member {member.name}: key {key!r} appears again after other keys")
                continue
            seen_keys.add(key)
            samples.append((key, {}))
        sample_members = samples[-1][1]
        if extension in sample_members:
            problems.append(f"member {member.name}: duplicate member in sample {key!r}")
            continue
        sample_members[extension] = (member.data_offset, member.size)
    return samples, problems


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _index_text(index: Mapping[str, Any]) -> str:
    return json.dumps(index, ensure_ascii=False, separators=(",", ":")) + "\n"


def _tar_header(name: str, size: int) -> tarfile.TarInfo:
    """A header whose every field is fixed, so the bytes depend on name and size only."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _ShardWriter:
    """Writes one tar and, on :meth:`finish`, its index; the caller rolls shards over."""

    def __init__(self, directory: Path, source: str, number: int) -> None:
        self.tar_name = f"{source}-{number:06d}.tar"
        self.index_name = f"{source}-{number:06d}.idx.json"
        self.tar_path = directory / self.tar_name
        # Both stay open across add() calls; finish() or abort() closes them, and write_shards removes the
        # staging directory on any error.
        self._handle = open(self.tar_path, "wb")  # noqa: SIM115
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._handle, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8"
        )
        self._expected: list[tuple[str, dict[str, str]]] = []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        digests: dict[str, str] = {}
        for extension, data in members:
            self._tar.addfile(_tar_header(f"{key}.{extension}", len(data)), io.BytesIO(data))
            digests[extension] = _member_digest(data)
        self._expected.append((key, digests))

    def __len__(self) -> int:
        return len(self._expected)

    def abort(self) -> None:
        self._handle.close()

    def finish(self) -> dict[str, Any]:
        """Close the tar, index it by walking its headers, write the index; return the manifest entry."""
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        tar_members, problems = _walk_tar(self.tar_path)
        samples, group_problems = _group_members(tar_members)
        problems += group_problems
        layout = [(key, list(offsets)) for key, offsets in samples]
        expected = [(key, list(digests)) for key, digests in self._expected]
        if problems or layout != expected:
            # Every name was validated before it was written, so this is a bug in this module, not bad input.
            raise RuntimeError(f"{self.tar_path}: the written tar reads back differently than written: {problems}")
        size = self.tar_path.stat().st_size
        sha256 = _file_sha256(self.tar_path)
        index = {
            "format": INDEX_FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "file": self.tar_name,
            "bytes": size,
            "sha256": sha256,
            "member_digest": MEMBER_DIGEST,
            "samples": [
                [key, {ext: [offset, length, digests[ext]] for ext, (offset, length) in offsets.items()}]
                for (key, offsets), (_, digests) in zip(samples, self._expected, strict=True)
            ],
        }
        index_text = _index_text(index)
        _write_text(self.tar_path.with_name(self.index_name), index_text)
        return {
            "file": self.tar_name,
            "index": self.index_name,
            "index_sha256": hashlib.sha256(index_text.encode("utf-8")).hexdigest(),
            "sha256": sha256,
            "samples": len(samples),
            "bytes": size,
        }


def _validated_members(sample: ShardSample) -> list[tuple[str, bytes]]:
    """The sample's members in write order, or a UserError naming the key and member."""
    problem = _key_problem(sample.key)
    if problem:
        raise UserError(f"sample {sample.key!r}: {problem}")
    if not sample.members:
        raise UserError(f"sample {sample.key!r}: has no members")
    members: list[tuple[str, bytes]] = []
    for extension in sorted(sample.members):
        name = f"{sample.key}.{extension}"
        problem = _extension_problem(extension)
        if problem:
            raise UserError(f"sample {sample.key!r}, member {name}: {problem}")
        if len(name.encode("utf-8")) > MAX_MEMBER_NAME_BYTES:
            raise UserError(f"sample {sample.key!r}, member {name}: name longer than {MAX_MEMBER_NAME_BYTES} bytes")
        data = sample.members[extension]
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"sample {sample.key!r}, member {name}: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        problem = _content_problem(extension, data, name)
        if problem:
            raise UserError(f"sample {sample.key!r}, member {problem}")  # the problem starts with the member name
        members.append((extension, data))
    return members


def _check_replaceable(out_dir: Path) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; expected a shard set directory or nothing")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise UserError(f"{out_dir}: refusing to replace a non-empty directory that holds no {MANIFEST_NAME}")


def write_shards(
    samples: Iterable[ShardSample],
    out_dir: str | Path,
    *,
    source: str,
    shard_size: int = 1000,
    extra_manifest: dict | None = None,
) -> dict:
    """Write ``samples`` as a shard set in ``out_dir`` and return its manifest.

    Writes ``{source}-000000.tar``, ... (``shard_size`` samples each, the last one possibly fewer), an
    ``{source}-NNNNNN.idx.json`` per shard and ``manifest.json`` (format and converter versions, total samples,
    per-shard file/index/sha256/samples/bytes, plus every key of ``extra_manifest``). An empty ``samples`` gives a
    manifest with no shards, so a converter that skipped everything can still say why.

    Atomic: files go to a temporary sibling directory that is renamed to ``out_dir`` only when complete; on any
    exception (including one raised by the ``samples`` iterator) the temporary directory is removed and an existing
    ``out_dir`` is left untouched. Deterministic: the same samples give byte-identical files.

    Raises:
        UserError: a bad source name, a bad or duplicate key, a member outside the whitelist (pickle-bearing ones
            included), a member name over 100 bytes, invalid JSON/UTF-8/npy content, or an ``out_dir`` that is a
            file or a non-empty directory without a manifest. The message names the key and member.
        ValueError: ``shard_size`` < 1 or ``extra_manifest`` redefines a reserved key.
    """
    if not isinstance(source, str) or not _SOURCE_PATTERN.fullmatch(source):
        raise UserError(f"source name {source!r}: expected letters, digits, '_' or '-' (it names the shard files)")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    extra = dict(extra_manifest or {})
    clashes = sorted(_RESERVED_MANIFEST_KEYS & extra.keys())
    if clashes:
        raise ValueError(f"extra_manifest may not redefine {', '.join(clashes)}")
    # Absolute but not resolved: "." gets a real name and parent, and a symlinked out_dir stays a symlink.
    out_dir = Path(os.path.abspath(out_dir))
    _check_replaceable(out_dir)
    writer: _ShardWriter | None = None
    with atomic.directory(out_dir, replace=True) as staging:  # an existing set is replaced only when complete
        try:
            entries: list[dict[str, Any]] = []
            seen_keys: set[str] = set()
            for sample in samples:
                members = _validated_members(sample)
                if sample.key in seen_keys:
                    raise UserError(f"sample {sample.key!r}: duplicate key (keys must be unique within a shard set)")
                seen_keys.add(sample.key)
                if writer is None:
                    writer = _ShardWriter(staging, source, len(entries))
                writer.add(sample.key, members)
                if len(writer) == shard_size:
                    entries.append(writer.finish())
                    writer = None
            if writer is not None:
                entries.append(writer.finish())
                writer = None
            manifest = {
                **extra,
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "source": source,
                "converter_version": __version__,
                "samples": sum(entry["samples"] for entry in entries),
                "shard_size": shard_size,
                "shards": entries,
            }
            manifest_text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            _write_text(staging / MANIFEST_NAME, manifest_text)
        except BaseException:
            if writer is not None:
                writer.abort()  # closes its open tar; the staging directory goes with the error
            raise
    logger.info("wrote %d samples in %d shards to %s", manifest["samples"], len(entries), out_dir)
    # Return what is on disk (JSON types: tuples in extra_manifest come back as lists).
    return json.loads(manifest_text)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the manifest and indexes (shared by ShardSet.open and verify_shards)


@dataclass(frozen=True)
class _ShardIndex:
    tar_path: Path
    keys: list[str]
    members: list[dict[str, tuple[int, int, str]]]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """A shard set's manifest, structurally checked (no shard or index is read).

    Raises:
        UserError: the directory or manifest is missing or malformed.
    """
    return _load_manifest(Path(directory))


def _load_manifest(directory: Path) -> dict[str, Any]:
    """The parsed, structurally checked manifest; UserError naming the file and key otherwise."""
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory (expected a shard set built by `rmpl-ds shards build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {directory} is not a complete shard set") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: 'format' is not {FORMAT_NAME!r}; not an rmpl_ds shard manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version!r} is not {FORMAT_VERSION}; rebuild the shards")
    if not isinstance(manifest.get("source"), str):
        raise UserError(f"{path}: 'source' must be a string")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise UserError(f"{path}: 'shards' must be a list")
    for number, entry in enumerate(shards):
        where = f"{path}: shards[{number}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object")
        tar_name, index_name = entry.get("file"), entry.get("index")
        # The names are joined to the directory, so they must be plain file names of the expected shape.
        if not isinstance(tar_name, str) or not _SHARD_FILE_PATTERN.fullmatch(tar_name):
            raise UserError(f"{where}.file: expected a plain name like 'source-000000.tar', got {tar_name!r}")
        if index_name != tar_name[: -len(".tar")] + ".idx.json":
            raise UserError(f"{where}.index: expected {tar_name[:-4]}.idx.json, got {index_name!r}")
        for name in ("samples", "bytes"):
            if not isinstance(entry.get(name), int) or isinstance(entry.get(name), bool) or entry[name] < 0:
                raise UserError(f"{where}.{name}: expected a non-negative integer, got {entry.get(name)!r}")
        for name in ("sha256", "index_sha256"):
            if not isinstance(entry.get(name), str) or not re.fullmatch(r"[0-9a-f]{64}", entry[name]):
                raise UserError(f"{where}.{name}: expected a sha256 hex digest, got {entry.get(name)!r}")
    total = sum(entry["samples"] for entry in shards)
    if manifest.get("samples") != total:
        raise UserError(f"{path}: 'samples' is {manifest.get('samples')!r} but the shards hold {total}")
    return manifest


def _load_index(directory: Path, entry: Mapping[str, Any]) -> _ShardIndex:
    """One shard's index, checked against its manifest entry and the whitelist; UserError naming the file."""
    path = directory / entry["index"]
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: index file missing (listed in {MANIFEST_NAME})") from None
    except OSError as exc:
        raise UserError(f"{path}: unreadable index: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
        raise UserError(f"{path}: sha256 differs from {MANIFEST_NAME}; the index was modified or corrupted")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT_NAME:
        raise UserError(f"{path}: 'format' is not {INDEX_FORMAT_NAME!r}")
    for name in ("file", "bytes", "sha256"):
        if index.get(name) != entry[name]:
            raise UserError(f"{path}: {name!r} is {index.get(name)!r} but {MANIFEST_NAME} says {entry[name]!r}")
    samples = index.get("samples")
    if not isinstance(samples, list) or len(samples) != entry["samples"]:
        found = len(samples) if isinstance(samples, list) else samples
        raise UserError(f"{path}: lists {found!r} samples but {MANIFEST_NAME} says {entry['samples']}")
    keys: list[str] = []
    members: list[dict[str, tuple[int, int, str]]] = []
    for number, sample in enumerate(samples):
        if not (isinstance(sample, list) and len(sample) == 2 and isinstance(sample[1], dict) and sample[1]):
            raise UserError(f"{path}: samples[{number}]: expected [key, {{extension: [offset, size, digest]}}]")
        key, extents = sample
        problem = _key_problem(key)
        if problem:
            raise UserError(f"{path}: samples[{number}]: {problem}")
        checked: dict[str, tuple[int, int, str]] = {}
        for extension, extent in extents.items():
            name = f"{key}.{extension}"
            problem = _extension_problem(extension)
            if problem:
                raise UserError(f"{path}: member {name}: {problem}")
            if not (
                isinstance(extent, list)
                and len(extent) == 3
                and all(isinstance(value, int) and not isinstance(value, bool) for value in extent[:2])
                and isinstance(extent[2], str)
            ):
                raise UserError(f"{path}: member {name}: expected [offset, size, digest], got {extent!r}")
            offset, size, digest = extent
            if offset < 0 or size < 0 or offset % _TAR_BLOCK or offset + size > entry["bytes"]:
                raise UserError(f"{path}: member {name}: [{offset}, {size}] lies outside the {entry['bytes']}-byte tar")
            if extension.rsplit(".", 1)[-1] == "json" and size > JSON_MAX_BYTES:
                raise UserError(f"{path}: member {name}: {size} bytes exceeds the JSON cap of {JSON_MAX_BYTES}")
            checked[extension] = (offset, size, digest)
        keys.append(key)
        members.append(checked)
    return _ShardIndex(directory / entry["file"], keys, members)


# ---------------------------------------------------------------------------------------------------------------------
# Random access


class ShardSet:
    """Random access to a built shard set: opens the manifest and indexes, never scans a tar at read time.

    Sample ``i`` (0 <= i < len; negative indices count from the end) is in shard order, then tar order. Reads use
    ``os.pread`` on one cached read-only descriptor per shard per process: the cache remembers the pid that filled
    it, so a forked DataLoader worker opens its own descriptors, and pickling (spawned workers) drops them.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], shards: list[_ShardIndex], max_pixels: int) -> None:
        self.directory = directory
        self.manifest = manifest
        self.source: str = manifest["source"]
        self.max_pixels = max_pixels
        self._shards = shards
        self._starts: list[int] = []
        total = 0
        for shard in shards:
            self._starts.append(total)
            total += len(shard.keys)
        self._length = total
        self._fds: dict[int, int] = {}
        self._fd_pid = os.getpid()
        self._fd_lock = threading.Lock()

    @classmethod
    def open(cls, directory: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ShardSet:
        """Open a shard set after checking the manifest, every index (sha256 against the manifest, whitelist of
        member extensions, extents inside the tar), each tar's presence and byte size, and key uniqueness.

        ``max_pixels`` is passed to :func:`rmpl_ds.images.load_image` by :meth:`read`.

        Raises:
            UserError: naming the manifest, index or tar file that is missing or inconsistent, or the member whose
                extension is refused.
        """
        directory = Path(directory)
        manifest = _load_manifest(directory)
        shards: list[_ShardIndex] = []
        first_shard_of_key: dict[str, str] = {}
        for entry in manifest["shards"]:
            shard = _load_index(directory, entry)
            try:
                size = shard.tar_path.stat().st_size
            except FileNotFoundError:
                raise UserError(f"{shard.tar_path}: shard missing (listed in {MANIFEST_NAME})") from None
            if size != entry["bytes"]:
                raise UserError(
                    f"{shard.tar_path}: {size} bytes but {MANIFEST_NAME} says {entry['bytes']}; "
                    "truncated or replaced (run `rmpl-ds shards verify`)"
                )
            for key in shard.keys:
                if key in first_shard_of_key:
                    first = first_shard_of_key[key]
                    raise UserError(f"{directory}: key {key!r} appears twice ({first}, {entry['file']})")
                first_shard_of_key[key] = entry["file"]
            shards.append(shard)
        return cls(directory, manifest, shards, max_pixels)

    def __len__(self) -> int:
        return self._length

    def _locate(self, i: int) -> tuple[int, int]:
        if not isinstance(i, int | np.integer):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        position = int(i) + self._length if i < 0 else int(i)
        if not 0 <= position < self._length:
            raise IndexError(f"sample {i} out of range for {self._length} samples in {self.directory}")
        shard_number = bisect.bisect_right(self._starts, position) - 1
        return shard_number, position - self._starts[shard_number]

    def key(self, i: int) -> str:
        """The WebDataset key of sample ``i``."""
        shard_number, local = self._locate(i)
        return self._shards[shard_number].keys[local]

    def _descriptor(self, shard_number: int) -> int:
        pid = os.getpid()
        if pid != self._fd_pid:
            # A forked child inherits the parent's descriptors (and possibly a lock held by a parent thread). pread
            # would work on them, but closing them here must not depend on what the parent does, so the child
            # forgets them without closing (the parent still owns them) and opens its own.
            self._fds = {}
            self._fd_lock = threading.Lock()
            self._fd_pid = pid
        with self._fd_lock:
            fd = self._fds.get(shard_number)
            if fd is None:
                path = self._shards[shard_number].tar_path
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise UserError(f"{path}: cannot open shard: {exc.strerror or exc}") from None
                self._fds[shard_number] = fd
            return fd

    def read_raw(self, i: int) -> dict[str, bytes]:
        """Sample ``i``'s members as bytes, keyed by extension (sorted order), one ``os.pread`` per member.

        Raises:
            IndexError: ``i`` out of range.
            UserError: the shard is unreadable or shorter than its index says.
        """
        shard_number, local = self._locate(i)
        shard = self._shards[shard_number]
        fd = self._descriptor(shard_number)
        key = shard.keys[local]
        members: dict[str, bytes] = {}
        for extension, (offset, size, _digest) in shard.members[local].items():
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise UserError(
                    f"{shard.tar_path}: member {key}.{extension}: read {len(data)} of {size} bytes; the shard is "
                    "truncated (run `rmpl-ds shards verify`)"
                )
            members[extension] = data
        return members

    def read(self, i: int) -> dict[str, object]:
        """Sample ``i``'s members decoded by the whitelist (see :func:`decode_member`).

        Raises:
            IndexError: ``i`` out of range.
            UserError: unreadable shard, or a member that does not decode (``ImageError`` for images).
        """
        shard_number, local = self._locate(i)
        prefix = f"{self._shards[shard_number].tar_path.name}: {self._shards[shard_number].keys[local]}"
        return {
            extension: decode_member(extension, data, name=f"{prefix}.{extension}", max_pixels=self.max_pixels)
            for extension, data in self.read_raw(i).items()
        }

    def fingerprint(self) -> str:
        """sha256 over the per-shard sha256s and sample counts (order included): equal fingerprints mean the same
        samples in the same order, whatever the directory or source is called."""
        content = [[entry["sha256"], entry["samples"]] for entry in self.manifest["shards"]]
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode("ascii")).hexdigest()

    def close(self) -> None:
        """Close this process's cached descriptors (reads after this re-open them)."""
        if self._fd_pid != os.getpid():
            self._fds = {}
            return
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown os may already be torn down; a leaked descriptor is harmless then.
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors and locks do not cross process boundaries; the receiving process opens its own.
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_fd_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd_lock = threading.Lock()
        self._fd_pid = os.getpid()

    def __repr__(self) -> str:
        return f"ShardSet({str(self.directory)!r}, source={self.source!r}, samples={self._length})"

    def splits(self) -> dict[str, list[int]]:
        """Sample indices by the ``split`` their record names (``train``, ``dev``, ``val``, ``test``, ``all``), in
        sample order. Reads each sample's JSON member once (one ``pread`` per sample) and caches the result."""
        cached = self.__dict__.get("_splits")
        if cached is None:
            cached = {}
            for index in range(self._length):
                raw = self.read_raw(index).get("json")
                try:
                    split = json.loads(raw)["split"] if raw is not None else None
                except (ValueError, KeyError, TypeError):
                    split = None
                cached.setdefault(str(split) if split is not None else "none", []).append(index)
            self._splits = cached
        return cached

    def subset(self, splits: Sequence[str]) -> ShardView:
        """The samples of the given record splits, as a shard set of their own (:class:`ShardView`).

        Raises:
            UserError: none of this set's samples is in those splits (the message lists the splits it has).
        """
        by_split = self.splits()
        indices = sorted(i for split in dict.fromkeys(splits) for i in by_split.get(split, []))
        if not indices:
            have = ", ".join(f"{split} {len(found)}" for split, found in sorted(by_split.items())) or "no samples"
            raise UserError(f"{self.directory}: no sample of split(s) {list(splits)} (it holds {have})")
        return ShardView(self, tuple(splits), np.asarray(indices, dtype=np.int64))


class ShardView:
    """Some samples of a :class:`ShardSet` (those of chosen record splits), read like a shard set: sample ``i`` is
    the base set's ``indices[i]``. Its fingerprint covers the base set's and the selection, so a sampler state
    saved on one selection is refused on another."""

    def __init__(self, base: ShardSet, splits: tuple[str, ...], indices: np.ndarray) -> None:
        self.base = base
        self.splits = splits
        self.indices = indices
        self.directory = base.directory
        self.manifest = base.manifest
        self.source = base.source

    def __len__(self) -> int:
        return len(self.indices)

    def _base_index(self, i: int) -> int:
        if not -len(self.indices) <= i < len(self.indices):
            raise IndexError(f"sample {i} out of range for {len(self.indices)} samples of {self}")
        return int(self.indices[i])

    def key(self, i: int) -> str:
        return self.base.key(self._base_index(i))

    def read_raw(self, i: int) -> dict[str, bytes]:
        return self.base.read_raw(self._base_index(i))

    def read(self, i: int) -> dict[str, object]:
        return self.base.read(self._base_index(i))

    def fingerprint(self) -> str:
        selection = hashlib.sha256(self.indices.tobytes()).hexdigest()
        content = [self.base.fingerprint(), list(self.splits), selection]
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode("ascii")).hexdigest()

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> ShardView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardView({str(self.directory)!r}, splits={list(self.splits)}, samples={len(self.indices)})"


# ---------------------------------------------------------------------------------------------------------------------
# Verification and description


def _verify_shard(directory: Path, entry: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Problems with one shard, each prefixed with its tar or index file name, and the keys its index lists."""
    tar_name = entry["file"]
    tar_path = directory / tar_name
    problems: list[str] = []
    if not tar_path.is_file():
        return [f"{tar_name}: missing (listed in {MANIFEST_NAME})"], []
    size = tar_path.stat().st_size
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "has extra bytes"
        problems.append(f"{tar_name}: {size} bytes but {MANIFEST_NAME} says {entry['bytes']}: {what}")
    sha_ok = _file_sha256(tar_path) == entry["sha256"]
    if not sha_ok:
        problems.append(f"{tar_name}: sha256 differs from {MANIFEST_NAME}")

    tar_members, walk_problems = _walk_tar(tar_path)
    problems += [f"{tar_name}: {problem}" for problem in walk_problems]
    tar_samples, group_problems = _group_members(tar_members)
    problems += [f"{tar_name}: {problem}" for problem in group_problems]
    in_tar = {f"{key}.{ext}": extent for key, extents in tar_samples for ext, extent in extents.items()}

    try:
        index = _load_index(directory, entry)
    except UserError as exc:
        problems.append(str(exc).replace(str(directory / entry["index"]), entry["index"]))
        index = None

    # Member-level findings: a shifted or truncated tar makes every later member wrong, so they are capped below.
    member_problems: list[str] = []
    changed_members: set[str] = set()
    with open(tar_path, "rb") as handle:
        fd = handle.fileno()
        if index is not None:
            listed: set[str] = set()
            for key, extents in zip(index.keys, index.members, strict=True):
                for extension, (offset, length, digest) in extents.items():
                    name = f"{key}.{extension}"
                    listed.add(name)
                    found = in_tar.get(name)
                    if offset + length > size:
                        member_problems.append(f"member {name}: lies past the end of the file: truncated")
                    elif found is None:
                        member_problems.append(f"member {name}: listed in the index but missing from the tar")
                    elif found != (offset, length):
                        # Compare the bytes where the tar really has them, to tell "moved" from "changed".
                        intact = _member_digest(os.pread(fd, found[1], found[0])) == digest
                        member_problems.append(
                            f"member {name}: index says offset {offset} size {length}, the tar has offset "
                            f"{found[0]} size {found[1]}" + ("" if intact else ", and its bytes differ")
                        )
                    elif _member_digest(os.pread(fd, length, offset)) != digest:
                        changed_members.add(name)
                        member_problems.append(f"member {name}: bytes differ from when the shard was written")
            member_problems += [
                f"member {name}: in the tar but not in the index" for name in in_tar if name not in listed
            ]
            if not member_problems and [key for key, _ in tar_samples] != index.keys:
                member_problems.append("samples are in a different order than in the index")
        for name, (offset, length) in in_tar.items():
            if offset + length > size or name in changed_members:
                continue
            problem = _content_problem(name.partition(".")[2], os.pread(fd, length, offset), name)
            if problem:
                member_problems.append(f"member {problem}")
    if len(member_problems) > _MAX_MEMBER_PROBLEMS:
        hidden = len(member_problems) - _MAX_MEMBER_PROBLEMS
        member_problems = [*member_problems[:_MAX_MEMBER_PROBLEMS], f"... and {hidden} more member problems"]
    problems += [f"{tar_name}: {problem}" for problem in member_problems]
    if not sha_ok and not member_problems and not walk_problems and not group_problems and index is not None:
        problems.append(f"{tar_name}: no member's bytes changed, so the difference is in tar headers or padding")
    return problems, index.keys if index is not None else []


def verify_shards(directory: str | Path) -> list[str]:
    """Re-hash every shard against the manifest and re-index it by walking its tar headers.

    Returns a list of problems, each naming the file and, where it applies, the member: a missing or truncated tar,
    a sha256 mismatch (and which members' bytes differ, from the per-member digests in the index), members missing
    from or extra to the index, pickle-bearing or non-whitelisted members, unsafe member paths (absolute, ``..``),
    invalid JSON/UTF-8/npy content, index inconsistencies, duplicate keys across shards, and stray ``.tar`` or
    ``.idx.json`` files the manifest does not list. Images are not decoded. An empty list means the set is intact.
    """
    directory = Path(directory)
    try:
        manifest = _load_manifest(directory)
    except UserError as exc:
        return [str(exc)]
    problems: list[str] = []
    first_shard_of_key: dict[str, str] = {}
    for entry in manifest["shards"]:
        shard_problems, keys = _verify_shard(directory, entry)
        problems += shard_problems
        for key in keys:
            if key in first_shard_of_key:
                problems.append(f"{entry['file']}: key {key!r} already used in {first_shard_of_key[key]}")
            else:
                first_shard_of_key[key] = entry["file"]

    listed = {entry["file"] for entry in manifest["shards"]} | {entry["index"] for entry in manifest["shards"]}
    for path in sorted(directory.iterdir()):
        if path.name.endswith((".tar", ".idx.json")) and path.name not in listed:
            problems.append(f"{path.name}: not listed in {MANIFEST_NAME}")
    return problems


def _describe_value(name: str, value: object, indent: str) -> Iterator[str]:
    if isinstance(value, dict):
        yield f"{indent}{name}:"
        for key in value:
            yield from _describe_value(str(key), value[key], indent + "  ")
    elif isinstance(value, list):
        shown = 5
        yield f"{indent}{name}: {len(value)} entries" + (f" (first {shown})" if len(value) > shown else "")
        for item in value[:shown]:
            yield f"{indent}  - {json.dumps(item, ensure_ascii=False, sort_keys=True)}"
    else:
        yield f"{indent}{name}: {value}"


def describe_shards(directory: str | Path) -> str:
    """A human-readable summary of a shard set from its manifest alone (no tar is read).

    Raises:
        UserError: the manifest is missing or malformed.
    """
    directory = Path(directory)
    manifest = _load_manifest(directory)
    shards = manifest["shards"]
    total_bytes = sum(entry["bytes"] for entry in shards)
    lines = [
        f"{directory}: source {manifest['source']}, {manifest['samples']} samples in {len(shards)} shards "
        f"({total_bytes / 2**20:.1f} MiB), format {manifest['format_version']}, "
        f"converter {manifest.get('converter_version')}",
    ]
    for key in sorted(manifest.keys() - _RESERVED_MANIFEST_KEYS):
        lines += _describe_value(key, manifest[key], "  ")
    return "\n".join(lines)
