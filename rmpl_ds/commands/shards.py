"""Build, verify and inspect shard sets (uncompressed WebDataset tars with a byte-offset index and a manifest).

  rmpl-ds shards build --source {ace,imsitu,swig,mnre,m2e2} --input PATH [--images DIR] --out DIR
                       [--shard-size N] [--strict] [--drop-negatives]
  rmpl-ds shards verify DIR
  rmpl-ds shards inspect DIR

`build` converts a real dataset (rmpl_ds.sources) to unified records and writes one sample per record: the record
as JSON (`json` member) plus, for imSitu/SWiG, MNRE and M2E2 images, the normalized image (`jpg`, or `png` when the
original is a PNG). Bad records are skipped and counted by reason in manifest.json (with the first examples of
each); with --strict the first one stops the build with its file and line or key, and nothing is written. The
shards appear only when complete, and rebuilding from the same input gives byte-identical shards.

`verify` re-hashes and re-indexes every shard and exits 1 naming each broken shard and member; `inspect` prints
the manifest's counts.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

HELP = "build, verify or inspect WebDataset shard sets of unified records"

logger = get_logger(__name__)

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
    build.add_argument("--images", type=Path, help="directory of the images the records refer to")
    build.add_argument("--out", required=True, type=Path, help="shard set directory to write (replaced when done)")
    build.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    build.add_argument(
        "--drop-negatives", action="store_true", help="leave out records without an M2E2 event / relation"
    )
    verify = actions.add_parser("verify", help="re-hash and re-index a shard set; exit 1 naming what is broken")
    verify.add_argument("directory", type=Path)
    inspect = actions.add_parser("inspect", help="print a shard set's counts from its manifest")
    inspect.add_argument("directory", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        return build(
            args.source,
            args.input,
            out_dir=args.out,
            images_dir=args.images,
            shard_size=args.shard_size,
            strict=args.strict,
            keep_negatives=not args.drop_negatives,
        )
    if args.action == "verify":
        return verify(args.directory)
    from rmpl_ds.shards import describe_shards

    print(describe_shards(args.directory))
    return 0


def build(
    source: str,
    input_path: Path,
    *,
    out_dir: Path,
    images_dir: Path | None = None,
    shard_size: int = 1000,
    strict: bool = False,
    keep_negatives: bool = True,
) -> int:
    """Convert ``input_path`` with the ``source`` converter and write the shard set ``out_dir``.

    Returns 0, or 1 when no record survived (the manifest is still written, so its skip reasons say why).

    Raises:
        UserError: a source that needs images without ``images_dir``, a missing input, the first bad record
            under ``strict``, or an image that changed between the conversion's check and the write.
    """
    from rmpl_ds.shards import write_shards
    from rmpl_ds.sources import IMAGE_SOURCES, SOURCES

    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if source in IMAGE_SOURCES:
        if images_dir is None:
            raise UserError(f"--images DIR is required for --source {source}: its records refer to image files")
        if not images_dir.is_dir():
            raise UserError(f"--images {images_dir}: not a directory")
    conversion = SOURCES[source](input_path, images_dir=images_dir, strict=strict, keep_negatives=keep_negatives)
    extra_manifest = {
        "detected_format": conversion.format,
        "input": input_path.name,
        "converter": SOURCES[source].__module__ + "." + SOURCES[source].__name__,
        "counts": conversion.counts,
        "skipped": skip_summary(conversion.skipped),
    }
    samples = _samples(conversion.records, images_dir if source in IMAGE_SOURCES else None)
    manifest = write_shards(samples, out_dir, source=source, shard_size=shard_size, extra_manifest=extra_manifest)
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{reason}: {entry['count']}" for reason, entry in skipped["by_reason"].items())
    print(
        f"{out_dir}: {manifest['samples']} samples in {len(manifest['shards'])} shards "
        f"(format {conversion.format}); skipped {skipped['total']}" + (f" ({reasons})" if reasons else "")
    )
    if manifest["samples"] == 0:
        logger.error("no record of %s could be converted; see 'skipped' in %s/manifest.json", input_path, out_dir)
        return 1
    return 0


def verify(directory: Path) -> int:
    """Print every problem :func:`rmpl_ds.shards.verify_shards` finds; 0 when there is none, else 1."""
    from rmpl_ds.shards import verify_shards

    problems = verify_shards(directory)
    if not problems:
        print(f"{directory}: ok")
        return 0
    print(f"{directory}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    for problem in problems:
        print(f"  {problem}")
    return 1


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


def _samples(records: list[Any], images_dir: Path | None) -> Iterator[Any]:
    from rmpl_ds.shards import ShardSample

    # MNRE pairs of one tweet are consecutive and share the image: keep the last one encoded.
    last_image: tuple[tuple[str, str], tuple[str, bytes]] | None = None
    for ordinal, record in enumerate(records):
        members = {"json": record_bytes(record)}
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
