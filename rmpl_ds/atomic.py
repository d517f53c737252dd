"""Writing files and directories so that what is there is complete: the package's one way to do it.

A file is written to a temporary sibling, flushed to disk and renamed over its name; a directory is filled under a
temporary sibling and renamed into place once complete. A reader (or a crash) sees the old content or the new, never
a half-written one. Renames stay on one file system because the temporaries are siblings.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (fsynced before the rename)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))


@contextmanager
def directory(out_dir: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to ``out_dir``; on success it becomes ``out_dir``, on failure it is deleted.

    ``replace``: an existing ``out_dir`` is replaced (moved aside for the instant between two renames and restored
    if the second fails: POSIX cannot swap two directories atomically); without it ``out_dir`` must be absent or
    empty. The caller checks what may be replaced before writing anything.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if not replace and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the result private to this user
    try:
        yield staging
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, out_dir: Path) -> None:
    _fsync_directory(staging)
    if not out_dir.exists():
        os.rename(staging, out_dir)
    elif out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(staging, out_dir)
    else:
        retired = out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(4)}")
        os.rename(out_dir, retired)
        try:
            os.rename(staging, out_dir)
        except BaseException:
            os.rename(retired, out_dir)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_directory(out_dir.parent)


def _fsync_directory(path: Path) -> None:
    """Make the renames in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
