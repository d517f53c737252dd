"""Checkpoints that are either complete or ignored.

Layout of a stage's checkpoint root::

    checkpoints/
      step0000100/            DeepSpeed's files: mp_rank_00_model_states.pt + one optimizer shard per rank
        rmpl_complete.json    the seal, written by rank 0 after every rank finished: step, world size, each rank's
                              files and the sha256 of every file
        universal/            DeepSpeed's universal form of this checkpoint, made once when a run resumes it on
                              another world size; sealed like a checkpoint (its own rmpl_complete.json)
      step0000200/
      latest                  the tag of the newest complete checkpoint; replaced atomically, written last

A checkpoint directory without ``rmpl_complete.json`` (a crash or kill -9 mid-write, a full disk) is never
chosen by ``--resume auto``. DeepSpeed's files are pickles, so before loading we re-hash every file and compare
it with the seal: a checkpoint that was modified after it was written is refused by ``--resume PATH`` and skipped,
with a warning, by ``--resume auto``, which takes the newest intact one. Every rank hashes the files it wrote and
rank 0 seals only files it sees itself, so the seal covers every rank's files and a checkpoint directory that is
not shared by all ranks cannot be sealed. Do not resume from checkpoints you did not write yourself.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmpl_ds import atomic, dist
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

log = get_logger(__name__)

MARKER = "rmpl_complete.json"
LATEST = "latest"
# DeepSpeed's universal form of a checkpoint (a subdirectory of it), and the prefix of its unfinished conversions.
UNIVERSAL = "universal"
_CONVERTING = ".universal-"
# DeepSpeed names each rank's ZeRO optimizer shard ``[bf16_]zero_pp_rank_<dp rank>_mp_rank_<mp rank>_optim_states.pt``;
# every other file (the model states) is written by rank 0.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


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


def file_writer(name: str) -> int:
    """The rank that writes the checkpoint file ``name`` (a path relative to the checkpoint directory)."""
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else 0


def _own_entry(name: str) -> bool:
    """Whether a top-level entry of a checkpoint directory is one of its files (not its seal or a seal being
    written, its universal form or an unfinished conversion)."""
    return name not in (MARKER, UNIVERSAL) and not name.startswith((f".{MARKER}", _CONVERTING))


def file_hashes(directory: Path, exclude: str = MARKER) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative path -> hex), except the seal file ``exclude``."""
    return {name: _sha256(directory / name) for name in _files(directory) if name != exclude}


def _files(directory: Path) -> list[str]:
    return [path.relative_to(directory).as_posix() for path in sorted(directory.rglob("*")) if path.is_file()]


def checkpoint_files(directory: Path) -> list[str]:
    """The checkpoint's own files under ``directory`` (relative paths, sorted): not its seal, its universal form or
    an unfinished conversion."""
    return [name for name in _files(directory) if _own_entry(name.split("/")[0])]


def checkpoint_hashes(directory: Path, writer: int | None = None) -> dict[str, str]:
    """sha256 of the checkpoint's own files under ``directory`` (relative path -> hex); with ``writer``, only the
    files that rank writes."""
    names = checkpoint_files(directory)
    return {name: _sha256(directory / name) for name in names if writer is None or file_writer(name) == writer}


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save(
    engine: Any,
    root: Path,
    step: int,
    client_state: dict[str, Any],
    *,
    keep_last: int,
    trainable_only: bool,
    after_write: Callable[[], None] | None = None,
    protect: str | None = None,
) -> CheckpointRef:
    """Save a checkpoint on every rank; rank 0 seals it (marker, ``latest``) once all ranks are done.

    Must be called by every rank. Rank 0 first removes what an earlier attempt left at this tag (an unsealed
    directory after a crash, or a checkpoint a resumed run replaces), so no stale shard of another world size can
    end up in the seal. Each rank hashes the files it wrote; rank 0 seals them only if it sees every one of them
    (same size), so the seal lists every rank's files, and a checkpoint directory that is not shared by all ranks
    is refused instead of sealed. A failure to write (disk full, unwritable directory) raises UserError naming the
    path; earlier checkpoints are left untouched because nothing older is deleted before a new checkpoint is
    sealed. ``after_write`` runs on each rank between writing its files and the seal (the tests' kill -9 during a
    checkpoint write). ``protect``: the tag of a checkpoint the ``keep_last`` rotation must keep (the best one of a
    stage with ``eval.keep_best``).
    """
    tag = tag_for(step)
    path = root / tag
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    dist.barrier()
    try:
        engine.save_checkpoint(
            str(root), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=trainable_only
        )
    except (OSError, RuntimeError) as error:  # torch.save reports unwritable targets as RuntimeError
        # torch's writer hides errno behind its own message (a full disk reads "unexpected pos ..."), so say how
        # much space is left.
        reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"cannot write checkpoint {path}: {reason} ({_free_space(root)}; earlier checkpoints in {root} are "
            "intact; free space or choose another --out)"
        ) from error
    if after_write is not None:
        after_write()
    dist.barrier()
    written = dist.all_gather_object(_written_by(path, dist.rank()))

    def seal() -> None:
        files = _check_visible(path, written)
        marker = {
            "tag": tag,
            "step": step,
            "world_size": dist.world_size(),
            "ranks": [sorted(rank["files"]) for rank in written],
            "files": files,
        }
        try:
            atomic.write_text(path / MARKER, json.dumps(marker, indent=1, sort_keys=True))
            atomic.write_text(root / LATEST, tag)
        except OSError as error:
            raise UserError(f"cannot seal checkpoint {path}: {error.strerror or error}") from error
        _prune(root, keep_last, current=tag, protect=protect)

    dist.on_main(seal)
    return CheckpointRef(root, tag, step)


def _written_by(path: Path, rank: int) -> dict[str, Any]:
    """What ``rank`` wrote into the checkpoint directory ``path``, as it sees it: its host, the sha256 and the size
    of each of its files."""
    report: dict[str, Any] = {"host": socket.gethostname(), "files": {}, "sizes": {}, "error": None}
    try:
        report["files"] = checkpoint_hashes(path, writer=rank)
        report["sizes"] = {name: (path / name).stat().st_size for name in report["files"]}
    except OSError as error:  # reported to rank 0, which refuses to seal: no rank is left waiting
        report["error"] = f"rank {rank} cannot read back its files: {error.strerror or error}"
    return report


def _check_visible(path: Path, written: list[dict[str, Any]]) -> dict[str, str]:
    """Every rank's files, as rank 0 sees them: each must be here with the size its writer saw, and nothing else
    may be. Returns the merged hashes; raises UserError for a directory the ranks do not share."""
    mine = set(checkpoint_files(path))
    files: dict[str, str] = {}
    for rank, report in enumerate(written):
        if report["error"]:
            raise UserError(f"cannot seal checkpoint {path}: {report['error']}")
        for name, size in sorted(report["sizes"].items()):
            where = path / name
            if name not in mine or where.stat().st_size != size:
                raise UserError(
                    f"cannot seal checkpoint {path}: rank {rank} (host {report['host']}) wrote {name}, which rank 0 "
                    f"(host {socket.gethostname()}) {'does not see' if name not in mine else 'sees with another size'}"
                    ". The run directory (--out) must be on a filesystem shared by all nodes (NFS, Lustre, ...)"
                )
        files.update(report["files"])
    unclaimed = sorted(mine - set(files))
    if unclaimed:
        raise UserError(f"cannot seal checkpoint {path}: {unclaimed[0]} was written by no rank of this run")
    return files


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB free there"
    except OSError:
        return "free space unknown"


def _prune(root: Path, keep_last: int, current: str, protect: str | None = None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and ``protect``; drop incomplete leftovers of earlier
    crashes."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())
    stale = [p for p in (complete[:-keep_last] if keep_last > 0 else []) if p.name != protect]
    stale += [p for p in root.iterdir() if p.is_dir() and not (p / MARKER).is_file() and p.name != current]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoint %s", path)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    return marker if isinstance(marker.get("step"), int) else None


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
    """The checkpoint to resume from, verified (every file re-hashed against its seal, nothing unpickled).

    ``auto``: the newest intact sealed checkpoint under ``root``, or None when there is none. A damaged one (a file
    missing, altered or added, an unreadable seal) is skipped with a warning naming it; when every sealed
    checkpoint is damaged, UserError (starting over silently would throw away the run). ``latest`` is only a hint:
    whatever it holds (even bytes that are not text), the seals decide. ``none``: None. Otherwise a path to a
    checkpoint directory (its parent is the root), refused with UserError if it is not intact.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return _newest_intact(root)
    path = Path(resume)
    marker = _read_marker(path) if path.is_dir() else None
    if marker is None:
        raise UserError(f"--resume {resume}: not a complete checkpoint directory (no valid {MARKER})")
    ref = CheckpointRef(path.parent, path.name, int(marker["step"]))
    verify(ref)
    return ref


def _newest_intact(root: Path) -> CheckpointRef | None:
    sealed = sorted(
        (path for path in root.iterdir() if path.is_dir() and (path / MARKER).exists()) if root.is_dir() else [],
        key=lambda path: path.name,
        reverse=True,
    )
    if not sealed:
        return None
    damaged = []
    for path in sealed:
        marker = _read_marker(path)
        try:
            if marker is None:
                raise UserError(f"{path / MARKER}: unreadable seal")
            ref = CheckpointRef(root, path.name, int(marker["step"]))
            verify(ref)
        except UserError as error:
            damaged.append(str(error))  # names the checkpoint and the file
            log.warning("checkpoint %s is damaged (%s); skipping it", path, error)
            continue
        _check_pointer(root, ref)
        return ref
    raise UserError(
        f"{root}: every sealed checkpoint is damaged, so --resume auto has nothing to resume from:\n  "
        + "\n  ".join(damaged)
        + "\nrestore one of them, or start over with --resume none"
    )


def _check_pointer(root: Path, chosen: CheckpointRef) -> None:
    """Say when ``latest`` disagrees with the checkpoint the seals chose (it is written last, so after a crash it
    may lag behind, or hold anything at all after a disk fault)."""
    pointer = root / LATEST
    try:
        named = pointer.read_bytes().decode("utf-8").strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        log.warning("checkpoint pointer %s is unreadable (not text); resuming from %s", pointer, chosen.tag)
        return
    if named != chosen.tag:
        log.warning("checkpoint pointer %s names %r; resuming from %s", pointer, named[:80], chosen.tag)


def verify(ref: CheckpointRef) -> None:
    """Re-hash the checkpoint's files against its seal and check that the seal covers every rank's optimizer shard;
    raises UserError naming the first problem."""
    marker = _read_marker(ref.path)
    if marker is None:
        raise UserError(f"{ref.path}: incomplete checkpoint (no valid {MARKER})")
    expected = marker["files"]
    actual = checkpoint_hashes(ref.path)
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            what = "missing" if name not in actual else "unexpected" if name not in expected else "modified"
            raise UserError(f"{ref.path / name}: {what} since the checkpoint was written; refusing to load it")
    shard_writers = {file_writer(name) for name in expected if _RANK_FILE.search(name)}
    world = marker.get("world_size")
    if shard_writers and isinstance(world, int) and shard_writers != set(range(world)):
        missing = sorted(set(range(world)) - shard_writers)
        raise UserError(
            f"{ref.path}: sealed for {world} ranks but holds no optimizer shard of rank(s) {missing} (written to a "
            "directory the ranks did not share?); refusing to load it"
        )


def seal_digest(ref: CheckpointRef) -> str:
    """sha256 of the checkpoint's seal: which files, with which contents (the ranks compare it before loading)."""
    return _sha256(ref.path / MARKER)


def saved_world_size(ref: CheckpointRef) -> int | None:
    """The world size the checkpoint was written by (from its seal; None for a seal without it)."""
    marker = _read_marker(ref.path)
    world = marker.get("world_size") if marker else None
    return world if isinstance(world, int) else None


def has_zero_shards(ref: CheckpointRef) -> bool:
    """Whether the optimizer state is partitioned over the ranks (ZeRO shards), i.e. tied to the world size."""
    marker = _read_marker(ref.path) or {"files": {}}
    return any(_RANK_FILE.search(name) for name in marker["files"])


# ------------------------------------------------------------------------------------------------ universal form


def universal_ref(ref: CheckpointRef) -> CheckpointRef:
    """Where the universal form of ``ref`` lives (``<checkpoint>/universal``), as a checkpoint of its own."""
    return CheckpointRef(ref.path, UNIVERSAL, ref.step)


def intact_universal(ref: CheckpointRef) -> CheckpointRef | None:
    """The universal form of ``ref`` if it was converted from exactly this checkpoint and is intact, else None."""
    target = universal_ref(ref)
    marker = _read_marker(target.path)
    if marker is None or marker.get("source_seal") != seal_digest(ref):
        return None
    try:
        verify(target)
    except UserError as error:
        log.warning("universal form %s is damaged (%s); converting again", target.path, error)
        return None
    return target


def convert_to_universal(ref: CheckpointRef, workers: int = 4) -> CheckpointRef:
    """DeepSpeed's universal form of the (verified) checkpoint ``ref``, made once and cached in
    ``<checkpoint>/universal`` with its own seal (the hashes of its files and the digest of the checkpoint's seal
    it came from). Runs ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` in a
    subprocess, into a temporary directory renamed into place when complete. Call on one rank. Raises UserError
    with DeepSpeed's reason when the conversion fails."""
    cached = intact_universal(ref)
    if cached is not None:
        log.info("universal form of %s: %s (cached)", ref.path, cached.path)
        return cached
    target = universal_ref(ref)
    for leftover in [target.path, *ref.path.glob(f"{_CONVERTING}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    work = ref.path / f"{_CONVERTING}{uuid.uuid4().hex[:12]}"
    out = work / UNIVERSAL  # DeepSpeed writes a `latest_universal` file beside its output folder: inside `work`
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ref.path),
        "--output_folder",
        str(out),
        "--inject_missing_state",
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
    ]
    began = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise UserError(
                f"{ref.path}: DeepSpeed could not convert this checkpoint to its universal format (needed to resume "
                f"it on another world size): {lines[-1] if lines else f'exit {result.returncode}'}; resume on the "
                "world size it was written by, or start over with --resume none"
            )
        marker = {
            "tag": UNIVERSAL,
            "step": ref.step,
            "world_size": None,
            "source_seal": seal_digest(ref),
            "files": checkpoint_hashes(out),
        }
        atomic.write_text(out / MARKER, json.dumps(marker, indent=1, sort_keys=True))
        out.rename(target.path)
    except OSError as error:
        raise UserError(
            f"cannot write the universal form of checkpoint {ref.path} beside it: {error.strerror or error}"
        ) from error
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "converted %s to DeepSpeed's universal format in %.1f s: %s", ref.path, time.perf_counter() - began, target.path
    )
    return target
