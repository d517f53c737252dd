"""Data sources: real dataset formats -> unified records (:mod:`rmpl_ds.records`).

:data:`SOURCES` maps a source name to its converter, ``convert(input_path, *, images_dir=None, strict=False,
keep_negatives=True) -> Conversion`` (the contract is :class:`~rmpl_ds.sources.base.Converter`). The pipeline,
``rmpl-ds shards build`` and evaluation look converters up here by name, never by sniffing paths.
:mod:`rmpl_ds.sources.demo` writes a small synthetic dataset in each of these real formats.
"""

from __future__ import annotations

from rmpl_ds.sources import ace, chat, imsitu, m2e2, mnre, pairs, schema
from rmpl_ds.sources.base import Conversion, Converter, Skip, SourceError, find_image
from rmpl_ds.sources.m2e2 import M2E2Gold, load_m2e2

SOURCES: dict[str, Converter] = {
    "ace": ace.convert,
    "imsitu": imsitu.convert_imsitu,
    "swig": imsitu.convert_swig,
    "mnre": mnre.convert,
    "m2e2": m2e2.convert,
    "chat": chat.convert,
    "pairs": pairs.convert,
    "schema": schema.convert,
}

# Sources whose records refer to image files (``shards build`` needs ``--images`` for them, or ``--no-images``).
IMAGE_SOURCES: frozenset[str] = frozenset({"imsitu", "swig", "mnre", "m2e2"})
# Sources whose every record refers to an image (an imSitu/SWiG situation is an image; an MNRE pair is an image-text
# pair): ``--no-images`` would leave nothing, so it is refused. M2E2's sentences need no image: it has a text part.
ALL_RECORDS_NEED_IMAGES: frozenset[str] = frozenset({"imsitu", "swig", "mnre"})

__all__ = [
    "ALL_RECORDS_NEED_IMAGES",
    "IMAGE_SOURCES",
    "SOURCES",
    "Conversion",
    "Converter",
    "M2E2Gold",
    "Skip",
    "SourceError",
    "find_image",
    "load_m2e2",
]
