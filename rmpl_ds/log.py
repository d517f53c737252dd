"""One logger setup for the package: rank-0-only console output by default."""

from __future__ import annotations

import logging
import os
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


# `rmpl-ds train --verbose` (and the pipeline's) sets it for the ranks: libraries keep their own output.
VERBOSE_ENV = "RMPL_VERBOSE"


def quiet_libraries() -> None:
    """Keep transformers' and bitsandbytes' chatter out of a training or evaluation process's output (weight-loading
    and shard-writing bars, INFO lines, a harmless bitsandbytes notice about an optional CPU kernel); the package's
    own lines are unaffected. A no-op when ``RMPL_VERBOSE`` is set."""
    if os.environ.get(VERBOSE_ENV):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
