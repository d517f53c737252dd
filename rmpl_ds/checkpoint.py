"""Checkpoints that are either complete or ignored.

Layout of a stage's checkpoint root::

    checkpoints/
      step0000100/            DeepSpeed's files: mp_rank_00_model_states.pt + one optimizer shard per rank
        rmpl_complete.json    written by rank 0 after every rank finished: step, world size, sha256 of each file
      step0000200/
      latest                  the tag of the newest complete checkpoint; replaced atomically, written last

A checkpoint directory without ``rmpl_complete.json`` (a crash or kill -9 mid-write, a full disk) is never
chosen by ``--resume auto``. DeepSpeed's files are pickles, so before loading we re-hash every file and compare
it with the marker: a checkpoint that was modified after it was written is refused. Do not resume from
checkpoints you did not write yourself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmpl_ds import dist
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

log = get_logger(__name__)

MARKER = "rmpl_complete.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


@dataclass(frozen=True)
class CheckpointRef:
    root: Path
    tag: str
    step: int

    @property
    def path(self) -> Path:
        return self.root / self.tag


def file_hashes(directory: Path, exclude: str = MARKER) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative path -> hex), except the seal file ``exclude``."""
    hashes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.relative_to(directory).as_posix() != exclude:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            hashes[str(path.relative_to(directory))] = digest.hexdigest()
    return hashes


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save(
    engine: Any,
    root: Path,
    step: int,
    client_state: dict[str, Any],
    *,
    keep_last: int,
    trainable_only: bool,
    after_write: Callable[[], None] | None = None,
) -> CheckpointRef:
    """Save a checkpoint on every rank; rank 0 seals it (marker, ``latest``) once all ranks are done.

    Must be called by every rank. A failure to write (disk full, unwritable directory) raises UserError
    naming the path; earlier checkpoints are left untouched because nothing is deleted before a new
    checkpoint is sealed. ``after_write`` runs on each rank between writing its files and the seal (the
    tests' kill -9 during a checkpoint write).
    """
    tag = tag_for(step)
    root.mkdir(parents=True, exist_ok=True)
    try:
        engine.save_checkpoint(
            str(root), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=trainable_only
        )
    except (OSError, RuntimeError) as error:  # torch.save reports unwritable targets as RuntimeError
        # torch's writer hides errno behind its own message (a full disk reads "unexpected pos ..."), so say how
        # much space is left.
        reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"cannot write checkpoint {root / tag}: {reason} ({_free_space(root)}; earlier checkpoints in {root} are "
            "intact; free space or choose another --out)"
        ) from error
    if after_write is not None:
        after_write()
    dist.barrier()
    if dist.is_main():
        try:
            marker = {"tag": tag, "step": step, "world_size": dist.world_size(), "files": file_hashes(root / tag)}
            _write_atomic(root / tag / MARKER, json.dumps(marker, indent=1, sort_keys=True))
            _write_atomic(root / LATEST, tag)
        except OSError as error:
            raise UserError(f"cannot seal checkpoint {root / tag}: {error.strerror or error}") from error
        _prune(root, keep_last, current=tag)
    dist.barrier()
    return CheckpointRef(root, tag, step)


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB free there"
    except OSError:
        return "free space unknown"


def _prune(root: Path, keep_last: int, current: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop incomplete leftovers of earlier crashes."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())
    stale = complete[:-keep_last] if keep_last > 0 else []
    stale += [p for p in root.iterdir() if p.is_dir() and not (p / MARKER).is_file() and p.name != current]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoint %s", path)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def complete_checkpoints(root: Path) -> list[CheckpointRef]:
    """Sealed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    refs = []
    for path in sorted(root.iterdir()):
        marker = _read_marker(path) if path.is_dir() else None
        if marker is not None:
            refs.append(CheckpointRef(root, path.name, int(marker["step"])))
    return refs


def find(root: Path, resume: str) -> CheckpointRef | None:
    """The checkpoint to resume from: ``auto`` (the latest complete one under ``root``, or None), ``none``,
    or a path to a checkpoint directory (its parent is the root). Raises UserError for a bad path."""
    if resume == "none":
        return None
    if resume == "auto":
        refs = complete_checkpoints(root)
        if not refs:
            return None
        pointer = root / LATEST
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
        by_tag = {ref.tag: ref for ref in refs}
        # `latest` is written after the marker, so it can only lag behind; trust the newest sealed one.
        newest = max(refs, key=lambda ref: ref.step)
        if named not in by_tag or by_tag[named].step < newest.step:
            log.warning(
                "checkpoint pointer %s names %r; resuming from the newest complete %s", pointer, named, newest.tag
            )
        return newest
    path = Path(resume)
    marker = _read_marker(path) if path.is_dir() else None
    if marker is None:
        raise UserError(f"--resume {resume}: not a complete checkpoint directory (no valid {MARKER})")
    return CheckpointRef(path.parent, path.name, int(marker["step"]))


def verify(ref: CheckpointRef) -> None:
    """Re-hash the checkpoint's files against its marker; raises UserError naming the first mismatch."""
    marker = _read_marker(ref.path)
    if marker is None:
        raise UserError(f"{ref.path}: incomplete checkpoint (no valid {MARKER})")
    actual = file_hashes(ref.path)
    expected = marker["files"]
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            what = "missing" if name not in actual else "unexpected" if name not in expected else "modified"
            raise UserError(f"{ref.path / name}: {what} since the checkpoint was written; refusing to load it")
