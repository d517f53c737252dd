"""Distributed helpers: the only module that asks torch.distributed or the launcher's environment.

There is no global rank state: every helper reads the process group (when one is initialized) or the
variables the `deepspeed` / `torchrun` launchers export, at call time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from rmpl_ds.errors import UserError

T = TypeVar("T")


def _initialized() -> bool:
    # A process group exists only if torch.distributed was imported; asking must not import torch (seconds).
    torch_dist = sys.modules.get("torch.distributed")
    return torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    if _initialized():
        import torch.distributed as torch_dist

        return torch_dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    if _initialized():
        import torch.distributed as torch_dist

        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """Rank of this process on its node; the launchers export LOCAL_RANK."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Processes of this job on this node: torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    return int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or "1")


def is_main() -> bool:
    """True on global rank 0: the process that owns console output, TensorBoard and pointers."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op outside a process group."""
    if _initialized():
        import torch.distributed as torch_dist

        torch_dist.barrier()


def all_gather_object(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), indexed by rank; ``[value]`` outside a process group. Collective: every
    rank must call it."""
    if not _initialized():
        return [value]
    import torch.distributed as torch_dist

    values: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, value)
    return values


def on_main(action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 while the other ranks wait; every rank returns its result, or raises the UserError it
    raised, so a refusal on rank 0 ends every rank with the same message instead of leaving them waiting in the next
    collective until the timeout. Any other exception on rank 0 is a bug: rank 0 raises it with its traceback, and the
    others raise a RuntimeError that names it. Collective: every rank must call it."""
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", action())
        except UserError as error:
            outcome = ("user_error", str(error))
        except Exception as error:
            if _initialized():
                _broadcast_from_main(("failed", f"{type(error).__name__}: {error}"))
            raise
    outcome = _broadcast_from_main(outcome)
    kind, value = outcome
    if kind == "user_error":
        raise UserError(value)
    if kind == "failed":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _broadcast_from_main(value: T) -> T:
    if not _initialized():
        return value
    import torch.distributed as torch_dist

    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
