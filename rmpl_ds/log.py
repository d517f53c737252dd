"""One logger setup for the package: rank-0-only console output by default."""

from __future__ import annotations

import logging
import sys

from rmpl_ds import dist

LOGGER_NAME = "rmpl_ds"
_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)d] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds the rank to each record and, unless `all_ranks`, keeps only rank 0's console output."""

    def __init__(self, all_ranks: bool) -> None:
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = dist.rank()
        return self.all_ranks or record.rank == 0


def setup_logging(level: int | str = logging.INFO, all_ranks: bool = False) -> logging.Logger:
    """Configure the package logger once (idempotent) and return it."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(all_ranks))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the package logger, e.g. ``get_logger(__name__)``."""
    if name == LOGGER_NAME or name.startswith(LOGGER_NAME + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
