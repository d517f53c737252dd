"""The DeepSpeed side of a stage: runtime setup, optimizer and schedule, the per-stream loss, signals, RNG state.

``train.py`` reads top to bottom and calls into this module; nothing here knows which stage it runs.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812  (the conventional name)

from rmpl_ds import dist
from rmpl_ds.config import StageConfig
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------ runtime


def configure_runtime(*, deterministic: bool) -> torch.device:
    """Pick the device for this rank and set what must be set before CUDA or the process group start.

    * GPU: bf16 is required (a clear error on GPUs without it); the caching allocator uses expandable
      segments (less fragmentation with variable-length VLM batches); GPUs without peer-to-peer access
      (RTX 4090 boxes) get ``NCCL_P2P_DISABLE=1``, otherwise NCCL hangs on the first collective.
    * CPU: DeepSpeed's CPU accelerator with gloo; ``deterministic`` turns on deterministic algorithms so
      that a resumed run reproduces the uninterrupted one bit for bit.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.cuda.is_available():
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


def init_distributed(device: torch.device) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


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
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, stage))
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------------- loss


@dataclass
class LossParts:
    """A micro-batch's loss and what the logs need: per-sample losses and target-token counts."""

    loss: torch.Tensor  # scalar, what backward sees
    sample_losses: torch.Tensor  # (B,) token-mean loss of each sample, fp32, detached
    target_tokens: torch.Tensor  # (B,) number of target tokens of each sample


def stream_loss(logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor) -> LossParts:
    """Per-sample token-mean cross entropy on the target tokens, weighted per sample by its stream's loss weight.

    The micro-batch loss is ``sum_i w_i * L_i / B``: with the sampler's exact ratios this is the paper's
    α:β:λ mixture of the per-task losses (and ``L_EM + L_AR`` in Stage II), whatever the sequence lengths.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    per_sample = token_loss.sum(dim=1) / counts.clamp(min=1)
    weights = loss_weights.to(per_sample.device, per_sample.dtype)
    loss = (per_sample * weights).sum() / per_sample.numel()
    return LossParts(loss=loss, sample_losses=per_sample.detach(), target_tokens=counts.detach())


# ------------------------------------------------------------------------------------------------ signals


class GracefulStop:
    """SIGTERM / SIGINT ask the loop to finish the current step, checkpoint and exit; a second signal aborts.

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

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was asked to stop (so all ranks stop at the same step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a short vector of floats over ranks (for per-stream loss sums and counts)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()
