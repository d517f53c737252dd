"""The DeepSpeed side of a stage: runtime setup, optimizer and schedule, non-finite losses, signals, RNG state,
and the test-only fault injection (the loss itself is in rmpl_ds.loss).

``train.py`` reads top to bottom and calls into this module; nothing here knows which stage it runs.
"""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from rmpl_ds import dist
from rmpl_ds.config import StageConfig
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger
from rmpl_ds.loss import LossParts
from rmpl_ds.mixing import sample_seed

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------------ runtime


def configure_runtime(*, deterministic: bool) -> torch.device:
    """Pick the device for this rank and set what must be set before CUDA or the process group start.

    * GPU: bf16 is required (a clear error on GPUs without it); the caching allocator uses expandable
      segments (less fragmentation with variable-length VLM batches); GPUs without peer-to-peer access
      (RTX 4090 boxes) get ``NCCL_P2P_DISABLE=1``, otherwise NCCL hangs on the first collective.
    * CPU: DeepSpeed's CPU accelerator with gloo; see :func:`configure_cpu_rank` for threads and the allocator;
      ``deterministic`` turns on deterministic algorithms so that a resumed run reproduces the uninterrupted one
      bit for bit.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.cuda.is_available():
        configure_cpu_rank()
        return torch.device("cpu")
    device = torch.device("cuda", dist.local_rank())
    torch.cuda.set_device(device)
    if not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserError(f"{name} does not support bf16; rmpl_ds trains in bf16 (Ampere or newer GPUs)")
    count = torch.cuda.device_count()
    if count > 1 and "NCCL_P2P_DISABLE" not in os.environ:
        peer = dist.local_rank() ^ 1 if dist.local_rank() ^ 1 < count else 0
        if peer != dist.local_rank() and not torch.cuda.can_device_access_peer(dist.local_rank(), peer):
            os.environ["NCCL_P2P_DISABLE"] = "1"
            log.info("GPUs have no peer-to-peer access (e.g. RTX 4090): set NCCL_P2P_DISABLE=1")
    return device


# glibc keeps this much free memory at the top of the heap instead of handing it back to the kernel after every
# step (M_TOP_PAD; the MALLOC_TOP_PAD_ variable does the same), and trims only above M_TRIM_THRESHOLD.
MALLOC_PAD_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_TOP_PAD = -1, -2  # <malloc.h>


def configure_cpu_rank(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Threads and allocator for a training rank on CPU cores (what a launcher leaves unset); returns what it set.

    * Threads: the node's cores split between its ranks (``OMP_NUM_THREADS``, when set, wins). torch would
      otherwise give every rank all the cores, so two ranks on two cores run four compute threads that preempt
      each other; torchrun sets one thread per rank for the same reason, the deepspeed launcher sets nothing.
    * Allocator: a step's large temporaries (logits, activations) are freed at its end, and glibc returns freed
      memory at the top of the heap to the kernel at once, so every step faults the same pages in again
      (bench/results/engine.md measured 35-44 % of a CPU step in those faults). Keeping 1 GiB of padding makes
      the next step reuse them. Skipped where the C library is not glibc or ``MALLOC_TOP_PAD_`` is set.
    """
    import ctypes
    import ctypes.util

    applied: dict[str, Any] = {}
    if not environ.get("OMP_NUM_THREADS"):
        threads = max(1, (os.cpu_count() or 1) // max(1, dist.local_world_size(environ)))
        torch.set_num_threads(threads)
        applied["threads"] = threads
    if "MALLOC_TOP_PAD_" not in environ:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return applied  # not glibc: its allocator has its own habits
        if mallopt(_M_TOP_PAD, MALLOC_PAD_BYTES) and mallopt(_M_TRIM_THRESHOLD, 2 * MALLOC_PAD_BYTES):
            applied["malloc_top_pad"] = MALLOC_PAD_BYTES
    return applied


# How long a rank waits in a collective (or the rendezvous) for the others before it gives up with an error. It
# must exceed the longest legitimate wait: rank 0 merging and writing an export, or hashing a checkpoint to seal it,
# while the others sit in a barrier (minutes for a 7-8B model). DeepSpeed's own default is 10 minutes.
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
COLLECTIVE_TIMEOUT_ENV = "RMPL_COLLECTIVE_TIMEOUT_S"


def collective_timeout_s(flag: float | None, environ: Mapping[str, str] = os.environ) -> float:
    """The collective timeout: ``--collective-timeout``, else ``$RMPL_COLLECTIVE_TIMEOUT_S``, else 30 minutes."""
    if flag is not None:
        value, where = flag, "--collective-timeout"
    elif environ.get(COLLECTIVE_TIMEOUT_ENV):
        where = COLLECTIVE_TIMEOUT_ENV
        try:
            value = float(environ[COLLECTIVE_TIMEOUT_ENV])
        except ValueError:
            raise UserError(f"{where}: expected a number of seconds, got {environ[where]!r}") from None
    else:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: must be a positive number of seconds, got {value}")
    return value


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """Join the process group. A collective that waits longer than ``timeout_s`` for a rank that hangs (or died
    without closing its sockets) raises on the waiting ranks, which then exit non-zero, so the launcher stops the
    job instead of hanging forever."""
    import deepspeed
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed creates its data-parallel groups (ZeRO's gradient reduction) with torch.distributed.new_group and
    # no timeout, which torch fills in from these module defaults (30 min gloo, 10 min NCCL), not from the world
    # group's: without this a rank stuck in ZeRO's reduction would wait out torch's default instead of ours.
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if device.type == "cpu":
        _unlink_shm_allreduce_buffer()


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    On CPU, DeepSpeed's shm comm op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (67 MB) per rank and never unlinks it, so every CPU run, and every killed one, left 67 MB per rank in /dev/shm
    (RAM) behind: a test suite leaked gigabytes. The peers open a rank's buffer by name while they initialize; after
    the barrier all have, so the name can go while the mappings (and the fast all-reduce) stay.
    """
    import torch.distributed as torch_dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        return
    torch_dist.barrier()
    name = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{torch_dist.get_rank()}"
    name.unlink(missing_ok=True)


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a rank gets when a peer hangs past the timeout or is gone (not a bug of this rank).

    NCCL reports them as ``DistError`` subclasses; gloo raises a plain RuntimeError whose message says so.
    """
    import torch.distributed as torch_dist

    if isinstance(error, torch_dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")
    )


# ------------------------------------------------------------------------------------- optimizer, schedule


def lr_factor(step: int, stage: StageConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps))
    floor = stage.min_lr_ratio
    if stage.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, stage: StageConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (no weight decay on biases and norms) and its lr schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise UserError("the model has no trainable parameters (check model.mode and the LoRA targets)")
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) updates DeepSpeed's flat fp32 partitions in one pass instead of a loop of ops.
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.999), eps=1e-8, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, stage))
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------ non-finite losses
#
# A micro-batch whose loss is NaN or inf must not reach the weights, and every rank must skip the same optimizer
# step (ZeRO averages gradients over ranks, and the ranks must stay in lockstep). The rank whose loss is not finite
# back-propagates ``poison_non_finite(loss)``, whose gradients are NaN; the gradient reduction spreads them to every
# rank's gradients, and DeepSpeed's overflow check (the one that skips fp16 loss-scale overflows; on by default for
# bf16 and fp32 under ZeRO; collective, so every rank decides alike) drops the step: no optimizer update, Adam
# moments and step count unchanged, the lr schedule does not advance, ``skipped_steps`` is counted in DeepSpeed's
# checkpoint. No extra collective is needed for it: the loop reads ``was_step_applied()`` and counts the
# non-finite micro-batches in the step's one metrics reduction, which also catches a DeepSpeed config that turned
# the check off (the step would have been applied: refused loudly). DeepSpeed's micro-step bookkeeping sees an
# ordinary step, so checkpoints and an exact resume work as for any other step.


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` scaled by NaN: its backward gives NaN gradients, so the optimizer step is skipped (see above)."""
    return loss * float("nan")


def poison_non_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` itself when it is finite, else :func:`poisoned` (NaN gradients whatever made it non-finite);
    decided on the device, so the host never waits for it."""
    # A factor computed off the graph: 1 (exact, the gradients unchanged) or NaN. torch.where(finite, loss,
    # poisoned(loss)) would not do: the branch not taken still gets 0 x NaN = NaN gradients.
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
    return loss * scale


def refuse_applied_non_finite_step() -> None:
    """A step with a non-finite loss that DeepSpeed applied anyway: the weights in memory are invalid."""
    raise RuntimeError(
        "DeepSpeed applied an optimizer step with non-finite gradients (is bf16.check_grad_overflow false in "
        "the DeepSpeed config?); the weights in memory are invalid, the last sealed checkpoint is not"
    )


# ------------------------------------------------------------------------------------------------ signals


class GracefulStop:
    """SIGTERM / SIGINT ask the loop to finish the current step, checkpoint and exit; a second signal aborts.

    ``requested`` is this rank's view; the loop agrees on it across ranks in each step's metrics reduction
    (rmpl_ds.train.train_step), so every rank stops after the same step.

    The deepspeed launcher forwards the signal it receives to every rank, and a terminal's Ctrl-C reaches the
    launcher and the ranks at once, so one user action can arrive twice within moments: a repeat within
    ``repeat_window_s`` of the first is the same request, not a second one. The launcher kills ranks that
    are still alive 30 s after it forwarded the signal, so the final checkpoint must fit in that time.
    """

    def __init__(self, repeat_window_s: float = 5.0) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._window = repeat_window_s
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self.signal_name, self._first_at = True, signal.Signals(signum).name, now
            log.warning("%s received: finishing the current step, then checkpointing", self.signal_name)
            return
        if now - self._first_at < self._window:
            return
        log.error("second signal: aborting without a checkpoint")
        os._exit(128 + signum)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------------ RNG state


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (collective: call on every rank)."""
    mine = capture_rng()
    if dist.world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


# Keeps the dropout seeds apart from the per-sample augmentation seeds, which come from the same (seed, slot).
_DROPOUT_DOMAIN = 0x64726F706F7574  # "dropout"


def dropout_seed(seed: int, first_slot: int) -> int:
    """torch's seed for the micro-batch whose first slot is ``first_slot`` (the loop seeds before each one): a pure
    function of (stage seed, slot), so a micro-batch gets the same dropout masks whichever rank draws it, at any
    world size and after any resume. (Rank-local RNG streams would give other masks when the world size changes.)"""
    return sample_seed(seed ^ _DROPOUT_DOMAIN, first_slot)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reduce_sums(values: torch.Tensor) -> list[float]:
    """Sum a short vector over ranks (collective: call on every rank) and bring it to the host, in one copy."""
    if dist.world_size() > 1:
        torch.distributed.all_reduce(values)
    return values.tolist()


# ------------------------------------------------------------------------------------- fault injection (tests)


@dataclass(frozen=True)
class Faults:
    """Faults the reliability tests inject into a real run, read from ``RMPL_FAULT_*`` environment variables.

    None is set in a real run (every field is then empty and every method a no-op). They exercise the real
    detection and recovery paths, only the cause is simulated:

    * ``RMPL_FAULT_NAN_STEPS=3,4``: the losses of optimizer steps 3 and 4 (1-based) become NaN;
    * ``RMPL_FAULT_KILL_IN_CHECKPOINT=6``: the rank SIGKILLs itself after writing its files of the step-6
      checkpoint, before the checkpoint is sealed (kill -9 during a checkpoint write);
    * ``RMPL_FAULT_DISK_FULL_AT_CHECKPOINT=4``: before writing the step-4 checkpoint the rank may no longer
      write files (RLIMIT_FSIZE 0 with SIGXFSZ ignored: writes fail with EFBIG, like a full disk);
    * ``RMPL_FAULT_RANK=1``: only that rank is affected (default: every rank).
    """

    nan_steps: frozenset[int] = frozenset()
    kill_in_checkpoint: int | None = None
    disk_full_at_checkpoint: int | None = None
    rank: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        def number(name: str) -> int | None:
            value = environ.get(name, "").strip()
            return int(value) if value else None

        steps = environ.get("RMPL_FAULT_NAN_STEPS", "")
        return cls(
            nan_steps=frozenset(int(part) for part in steps.split(",") if part.strip()),
            kill_in_checkpoint=number("RMPL_FAULT_KILL_IN_CHECKPOINT"),
            disk_full_at_checkpoint=number("RMPL_FAULT_DISK_FULL_AT_CHECKPOINT"),
            rank=number("RMPL_FAULT_RANK"),
        )

    def _here(self) -> bool:
        return self.rank is None or self.rank == dist.rank()

    @staticmethod
    def _say(what: str) -> None:
        # On stderr from whichever rank it happens on (the package log shows rank 0 only).
        print(f"rmpl_ds fault injection [rank {dist.rank()}]: {what}", file=sys.stderr, flush=True)

    def nan_at(self, step: int) -> bool:
        """Whether the losses of optimizer step ``step`` (1-based) are to be replaced by NaN on this rank."""
        return step in self.nan_steps and self._here()

    @staticmethod
    def nan_loss(parts: LossParts) -> LossParts:
        """``parts`` with a NaN loss (its graph kept, as a real overflow would have it)."""
        return LossParts(poisoned(parts.loss), parts.sample_losses * float("nan"), parts.target_tokens)

    def before_checkpoint(self, step: int) -> None:
        if self.disk_full_at_checkpoint == step and self._here():
            self._say("no file may grow from now on (simulated full disk)")
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def checkpoint_written(self, step: int) -> None:
        if self.kill_in_checkpoint == step and self._here():
            self._say(f"SIGKILL in the middle of writing checkpoint {step}")
            os.kill(os.getpid(), signal.SIGKILL)
