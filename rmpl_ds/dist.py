"""Distributed helpers: the only module that asks torch.distributed or the launcher's environment.

There is no global rank state: every helper reads the process group (when one is initialized) or the
variables the `deepspeed` / `torchrun` launchers export, at call time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


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
