"""Build, verify and inspect shard sets (uncompressed WebDataset tars with a byte-offset index and a manifest).

  rmpl-ds shards build --source {ace,imsitu,swig,mnre,m2e2,chat,pairs} --input PATH [--images DIR | --no-images]
                       --out DIR
                       [--shard-size N] [--strict] [--drop-negatives]
  rmpl-ds shards verify DIR
  rmpl-ds shards inspect DIR [--model MODEL_DIR] [--max-seq-len N] [--limit N]

`build` converts a real dataset (rmpl_ds.sources) to unified records and writes one sample per record: the record
as JSON (`json` member) plus, for imSitu/SWiG, MNRE and M2E2 images, the normalized image (`jpg`, or `png` when the
original is a PNG); a chat conversation (rmpl_ds.sources.chat) stores its images, in order, as `0.jpg`, `1.png`,
and so on. Bad records are skipped and counted by reason in manifest.json (with the first examples of each); with
--strict the first one stops the build with its file and line or key, and nothing is written. A JSON file that does
not parse as a whole is an error even without --strict (its records cannot be read one by one). The shards appear
only when complete, and rebuilding from the same input gives byte-identical shards, manifest included.

Images: --images DIR must hold the images the records refer to; an empty DIR, or one where none of them is found,
is an error. M2E2 does not distribute its images: --no-images builds its text part (the sentences) and leaves out
the image records and the cross-media links, which the build output and the manifest's `left_out` state. Sources
whose every record needs its image (imsitu, swig, mnre) refuse --no-images.

A build that yields no sample is an error (exit 2) that prints the skip reasons and writes nothing, so no set that
looks complete but holds nothing is left behind (an existing set at --out is kept).

Chat (--source chat): --input is a chat file or directory (OpenAI messages, ShareGPT / LLaMA-Factory, LLaVA; JSON,
JSON Lines, Parquet, a save_to_disk directory); relative image paths resolve against --images, else against the
input's folder; --no-images does not apply.

Pairs (--source pairs, rmpl_ds.sources.pairs): --input is an ImageFolder captions directory (metadata.jsonl with
file_name and text, the images beside it) whose images are found beside the metadata, or under --images when
given; each unlabeled image-caption pair is stored with its image as member `jpg` (or `png`), like an image record;
--no-images does not apply. `rmpl-ds pseudo-label` reads such a set.

`verify` re-hashes and re-indexes every shard; a missing, damaged or empty set is bad input: exit 2, naming each
broken shard and member. `inspect` prints the manifest's counts; for a chat set also the assistant turns and images
per conversation, and with --model the token lengths each conversation encodes to for that checkpoint (family from
its config.json), and how many exceed --max-seq-len.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmpl_ds.errors import USER_ERROR_EXIT, UserError

if TYPE_CHECKING:
    from rmpl_ds.sources import Conversion

HELP = "build, verify or inspect WebDataset shard sets of unified records"

# Keys are `<ordinal>-<record id made safe>`: the ordinal keeps keys unique and in input order (M2E2 sentence and
# image ids can be the same string), the id makes a sample traceable. Member names must fit USTAR's 100 bytes.
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_MAX_ID_IN_KEY = 80
# How many examples of each skip reason the manifest keeps.
SKIP_EXAMPLES = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmpl_ds.sources import SOURCES

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="convert a real dataset and write its shard set")
    build.add_argument("--source", required=True, choices=sorted(SOURCES), help="which dataset format to read")
    build.add_argument("--input", required=True, type=Path, help="the dataset file or directory")
    images = build.add_mutually_exclusive_group()
    images.add_argument("--images", type=Path, help="directory of the images the records refer to")
    images.add_argument(
        "--no-images",
        action="store_true",
        help="build only the records that need no image (M2E2: the sentences); refused for imsitu, swig, mnre",
    )
    build.add_argument("--out", required=True, type=Path, help="shard set directory to write (replaced when done)")
    build.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    build.add_argument(
        "--drop-negatives", action="store_true", help="leave out records without an M2E2 event / relation"
    )
    verify = actions.add_parser(
        "verify", help="re-hash and re-index a shard set; exit 2 naming what is broken (or missing, or empty)"
    )
    verify.add_argument("directory", type=Path)
    inspect = actions.add_parser("inspect", help="print a shard set's counts from its manifest")
    inspect.add_argument("directory", type=Path)
    inspect.add_argument(
        "--model", type=Path, help="chat sets: a model directory whose tokenizer measures the token lengths"
    )
    inspect.add_argument(
        "--max-seq-len", type=int, default=2048, help="with --model: count the conversations longer than this (2048)"
    )
    inspect.add_argument(
        "--limit", type=int, default=1000, help="with --model: measure at most this many samples, evenly spread"
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        return build(
            args.source,
            args.input,
            out_dir=args.out,
            images_dir=args.images,
            no_images=args.no_images,
            shard_size=args.shard_size,
            strict=args.strict,
            keep_negatives=not args.drop_negatives,
        )
    if args.action == "verify":
        return verify(args.directory)
    from rmpl_ds.shards import describe_shards, read_manifest
    from rmpl_ds.sources.chat import SOURCE as CHAT

    print(describe_shards(args.directory))
    if read_manifest(args.directory)["source"] == CHAT:
        from rmpl_ds.chat import describe_chat_shards

        print(describe_chat_shards(args.directory, args.model, max_seq_len=args.max_seq_len, limit=args.limit))
    elif args.model is not None:
        raise UserError(f"--model: token lengths are measured for chat sets; {args.directory} is not one")
    return 0


def build(
    source: str,
    input_path: Path,
    *,
    out_dir: Path,
    images_dir: Path | None = None,
    no_images: bool = False,
    shard_size: int = 1000,
    strict: bool = False,
    keep_negatives: bool = True,
) -> int:
    """Convert ``input_path`` with the ``source`` converter and write the shard set ``out_dir``; returns 0.

    ``no_images``: keep only the records that refer to no image (see the module docstring); the manifest's
    ``left_out`` counts the others by kind.

    Raises:
        UserError: a source that needs images without ``images_dir`` (or ``no_images`` for one whose every record
            needs one), an images directory that is missing, empty or holds none of the images, a missing input,
            a JSON file that does not parse, the first bad record under ``strict``, a conversion that yields no
            record (nothing is written then), or an image that changed between the conversion's check and the
            write.
    """
    from rmpl_ds.shards import write_shards
    from rmpl_ds.sources import ALL_RECORDS_NEED_IMAGES, IMAGE_SOURCES, SOURCES

    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    _check_images_option(source, images_dir, no_images, IMAGE_SOURCES, ALL_RECORDS_NEED_IMAGES)
    conversion = SOURCES[source](input_path, images_dir=images_dir, strict=strict, keep_negatives=keep_negatives)
    if images_dir is not None:
        _check_images_found(conversion, images_dir)
    records, counts, left_out = conversion.records, conversion.counts, {}
    if no_images:
        records, counts, left_out = _without_images(conversion)
    skipped = skip_summary(conversion.skipped)
    reasons = ", ".join(f"{reason}: {entry['count']}" for reason, entry in skipped["by_reason"].items())
    if not records:
        raise UserError(_nothing_to_write(input_path, out_dir, skipped, reasons, left_out))
    extra_manifest = {
        "detected_format": conversion.format,
        "input": input_path.name,
        "converter": SOURCES[source].__module__ + "." + SOURCES[source].__name__,
        "counts": counts,
        "skipped": skipped,
    }
    if left_out:
        extra_manifest["left_out"] = left_out
    samples = _samples(records, images_dir if source in IMAGE_SOURCES else None, conversion.image_members)
    manifest = write_shards(samples, out_dir, source=source, shard_size=shard_size, extra_manifest=extra_manifest)
    print(
        f"{out_dir}: {manifest['samples']} samples in {len(manifest['shards'])} shards "
        f"(format {conversion.format}); skipped {skipped['total']}" + (f" ({reasons})" if reasons else "")
    )
    if left_out:
        kinds = ", ".join(f"{count} {kind}" for kind, count in left_out["records"].items())
        print(f"{out_dir}: left out ({left_out['because']}): {kinds or 'nothing'}")
    return 0


def _check_images_option(
    source: str, images_dir: Path | None, no_images: bool, image_sources: frozenset[str], need_images: frozenset[str]
) -> None:
    """UserError for an ``--images`` / ``--no-images`` choice that cannot give a useful set."""
    from rmpl_ds.sources.chat import SOURCE as CHAT
    from rmpl_ds.sources.pairs import SOURCE as PAIRS

    if source in (CHAT, PAIRS):
        if no_images:
            kept = "a conversation keeps its images" if source == CHAT else "a pair is an image with its caption"
            raise UserError(f"--no-images: does not apply to --source {source} ({kept})")
        if images_dir is not None and not images_dir.is_dir():
            raise UserError(f"--images {images_dir}: not a directory")
        return
    if no_images:
        if images_dir is not None:
            raise UserError("--images and --no-images: give one of them")
        if source in need_images:
            raise UserError(
                f"--no-images: every {source} record needs its image, so there is no text part to build; "
                "give --images DIR"
            )
        return
    if source not in image_sources:
        return
    if images_dir is None:
        hint = "" if source in need_images else " (or --no-images for the records that need none)"
        raise UserError(f"--images DIR is required for --source {source}: its records refer to image files{hint}")
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir}: not a directory")
    if not any(images_dir.iterdir()):
        raise UserError(f"--images {images_dir}: empty directory; expected the images the {source} records refer to")


def _check_images_found(conversion: Conversion, images_dir: Path) -> None:
    """UserError when records refer to images and not one of them is in ``images_dir`` (a wrong directory)."""
    from rmpl_ds.sources.base import IMAGE_NOT_FOUND

    missing = [skip for skip in conversion.skipped if skip.reason == IMAGE_NOT_FOUND]
    found = any(getattr(record, "image", None) or getattr(record, "images", None) for record in conversion.records)
    if missing and not found:
        raise UserError(
            f"--images {images_dir}: none of the {len(missing)} images the records refer to is there "
            f"(first: {missing[0]}); is it the right directory?"
        )


def _without_images(conversion: Conversion) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """``--no-images``: (the records that refer to no image, their counts, what was left out by record kind).

    The converter's own counts (M2E2's gold counts, the coreference inconsistencies) describe the files read and
    are kept; the record counts are recomputed over what is written.
    """
    from rmpl_ds.records import CrossMediaLink, ImageRecord, RelationPair
    from rmpl_ds.sources.base import count_records

    needs_image = (ImageRecord, RelationPair, CrossMediaLink)
    kept = [record for record in conversion.records if not isinstance(record, needs_image)]
    left = Counter(record.kind for record in conversion.records if isinstance(record, needs_image))
    record_counts = count_records(conversion.records)
    counts = {key: value for key, value in conversion.counts.items() if key not in record_counts}
    counts.update(count_records(kept))
    return kept, counts, {"because": "--no-images", "records": dict(sorted(left.items()))}


def _nothing_to_write(
    input_path: Path, out_dir: Path, skipped: dict[str, Any], reasons: str, left_out: dict[str, Any]
) -> str:
    """The error for a build that yields no record: why, with the first examples (the manifest is not written)."""
    lines = [f"{input_path}: no record to write, so {out_dir} was not written (an existing set there is kept)"]
    if skipped["total"]:
        lines.append(f"  skipped {skipped['total']} ({reasons}); the first of each reason:")
        lines += [f"    {entry['examples'][0]}" for entry in skipped["by_reason"].values()]
    if left_out:
        lines.append(f"  left out ({left_out['because']}): {left_out['records']}")
    return "\n".join(lines)


def verify(directory: Path) -> int:
    """Print every problem :func:`rmpl_ds.shards.verify_shards` finds; 0 when there is none, else 2 (bad input).

    Raises:
        UserError: the set is intact but holds no sample (nothing for a stage to read, and no build writes one).
    """
    from rmpl_ds.shards import read_manifest, verify_shards

    problems = verify_shards(directory)
    if not problems:
        if read_manifest(directory)["samples"] == 0:
            raise UserError(f"{directory}: the shard set holds no sample; rebuild it (`rmpl-ds shards build`)")
        print(f"{directory}: ok")
        return 0
    print(f"{directory}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    for problem in problems:
        print(f"  {problem}")
    return USER_ERROR_EXIT


def skip_summary(skipped: list[Any]) -> dict[str, Any]:
    """Skipped records for the manifest: the total, and per reason the count and the first examples."""
    by_reason: dict[str, dict[str, Any]] = {}
    counts = Counter(skip.reason for skip in skipped)
    for skip in skipped:
        entry = by_reason.setdefault(skip.reason, {"count": counts[skip.reason], "examples": []})
        if len(entry["examples"]) < SKIP_EXAMPLES:
            entry["examples"].append(str(skip))
    return {"total": len(skipped), "by_reason": dict(sorted(by_reason.items()))}


def sample_key(ordinal: int, record: Any) -> str:
    """The shard key of the ``ordinal``-th record: ``0000012-VOA_EN_NW_2015_11_26_3074855_5``."""
    record_id = getattr(record, "id", None)
    if record_id is None:  # a CrossMediaLink is named by what it links
        record_id = f"{record.sentence_id}-{record.image_id}"
    return f"{ordinal:07d}-{_UNSAFE_KEY_CHARS.sub('_', record_id)[:_MAX_ID_IN_KEY]}"


def record_bytes(record: Any) -> bytes:
    """A record as canonical JSON bytes (sorted keys, no spaces, UTF-8), so rebuilds are byte-identical."""
    from rmpl_ds.records import to_json

    return json.dumps(to_json(record), ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _samples(
    records: list[Any], images_dir: Path | None, image_members: Callable[[Any], list[tuple[str, bytes]]] | None = None
) -> Iterator[Any]:
    from rmpl_ds.records import ChatRecord
    from rmpl_ds.shards import ShardSample

    # MNRE pairs of one tweet are consecutive and share the image: keep the last one encoded.
    last_image: tuple[tuple[str, str], tuple[str, bytes]] | None = None
    for ordinal, record in enumerate(records):
        members = {"json": record_bytes(record)}
        if image_members is not None and isinstance(record, ChatRecord):
            # A conversation's images, in order: 0.jpg, 1.png, ...
            for index, (extension, data) in enumerate(image_members(record)):
                members[f"{index}.{extension}"] = data
            yield ShardSample(sample_key(ordinal, record), members)
            continue
        if image_members is not None:  # one image the converter located itself (a caption pair's): jpg or png
            for extension, data in image_members(record):
                members[extension] = data
            yield ShardSample(sample_key(ordinal, record), members)
            continue
        image_name = getattr(record, "image", None)
        if images_dir is not None and image_name:
            wanted = (image_name, record.split)
            if last_image is None or last_image[0] != wanted:
                last_image = (wanted, _image_member(record, images_dir))
            extension, data = last_image[1]
            members[extension] = data
        yield ShardSample(sample_key(ordinal, record), members)


def _image_member(record: Any, images_dir: Path) -> tuple[str, bytes]:
    """(member extension, normalized image bytes) of a record's image, which the converter already checked."""
    from rmpl_ds.images import encode_image, load_image
    from rmpl_ds.records import ImageRecord
    from rmpl_ds.sources import find_image

    path = find_image(images_dir, record.image, record.split)
    if path is None:
        raise UserError(f"{images_dir / record.image}: image not found (it was there when the records were converted)")
    image = load_image(path)
    if isinstance(record, ImageRecord) and image.size != (record.width, record.height):
        raise UserError(
            f"{path}: now {image.size[0]}x{image.size[1]}, was {record.width}x{record.height} when converted"
        )
    if path.suffix.lower() == ".png":
        return "png", encode_image(image, "png")
    return "jpg", encode_image(image, "jpeg")
