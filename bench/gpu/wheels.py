"""The wheels bench/gpu/run.sh carries to a GPU machine: their manifest, the checks, the install command.

The GPU machine has CUDA torch, an older transformers and peft, and no deepspeed, bitsandbytes or pydantic; nothing
there can reach a registry. ``prepare.sh`` (run where pip reaches one) puts the missing wheels into ``.whl/`` (git
ignores it; the device call names it in ``carry``) and writes ``.whl/manifest.json`` with this script. On the GPU
machine ``run.sh`` checks the set against the manifest and this interpreter's tags, then installs it with
``pip install --no-index --no-deps --target SITE``; ``PYTHONPATH=SITE`` puts it before the image's own packages. In
``--cpu-smoke`` the same check runs against the GPU's interpreter (CPython 3.12, manylinux x86-64) and the same pip
command installs into a temporary directory with pip's cross-install flags, so a broken set shows here, not in the
GPU's minutes.

Usage (only the Python standard library and ``packaging``, both on the GPU image)::

    python bench/gpu/wheels.py slim-bitsandbytes .whl/bitsandbytes-*.whl --keep cuda130 --keep cpu
    python bench/gpu/wheels.py manifest .whl --require deepspeed --require transformers ...
    python bench/gpu/wheels.py check .whl [--target-python 3.12]
    python bench/gpu/wheels.py install .whl --site /tmp/rmpl-gpu-site [--dry-run]

Exit codes: 0 fine, 2 a problem with the wheel set (each one named, with its file).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"
# The device tool's limit on what travels: the working tree (tracked and untracked-not-ignored files) + carried paths.
CARRY_LIMIT_BYTES = 64 * 2**20
# The GPU machine's interpreter (/opt/torch/.venv/bin/python3 there, Python 3.12) and the manylinux tags its pip takes.
GPU_PYTHON = "3.12"
GPU_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
USER_ERROR_EXIT = 2


class WheelSetError(Exception):
    """A problem with the wheel set; the message names the file."""


# ------------------------------------------------------------------------------------------------- facts


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_facts(path: Path) -> dict[str, Any]:
    """Name, version and tags from a wheel's file name (PEP 427), its size and sha256."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    try:
        name, version, _, tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as error:
        raise WheelSetError(f"{path}: not a wheel file name ({error})") from None
    return {
        "file": path.name,
        "name": str(canonicalize_name(name)),
        "version": str(version),
        "tags": sorted(str(tag) for tag in tags),
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
    }


def target_tags(python: str | None) -> set[str]:
    """The wheel tags an interpreter accepts: this one (``None``), or CPython ``python`` on manylinux x86-64."""
    from packaging import tags

    if python is None:
        return {str(tag) for tag in tags.sys_tags()}
    version = tuple(int(part) for part in python.split("."))
    interpreter = f"cp{version[0]}{version[1]}"
    accepted = tags.cpython_tags(version, abis=[interpreter, "abi3", "none"], platforms=GPU_PLATFORMS)
    compatible = tags.compatible_tags(version, interpreter=interpreter, platforms=GPU_PLATFORMS)
    return {str(tag) for tag in (*accepted, *compatible)}


def travelling_tree_bytes(root: Path = ROOT) -> int | None:
    """Bytes of what a device call sends besides carried paths: tracked and untracked-not-ignored files (None
    without git, e.g. on the GPU machine, where the tree has already travelled)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for name in filter(None, listed.split(b"\0")):
        path = root / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


# ------------------------------------------------------------------------------------------------- manifest


def write_manifest(wheel_dir: Path, required: list[str], notes: dict[str, str]) -> dict[str, Any]:
    """Describe every wheel in ``wheel_dir`` (``required``: the distributions the GPU machine lacks, each of which
    must be there) and write ``wheel_dir/manifest.json``; raises WheelSetError for a set that would not install."""
    from packaging.utils import canonicalize_name

    wheels = [wheel_facts(path) for path in sorted(wheel_dir.glob("*.whl"))]
    for wheel in wheels:
        if wheel["name"] in notes:
            wheel["note"] = notes[wheel["name"]]
    manifest = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": {"python": GPU_PYTHON, "implementation": "cp", "platforms": list(GPU_PLATFORMS)},
        "required": sorted(str(canonicalize_name(name)) for name in required),
        "wheels": wheels,
        "wheel_bytes": sum(wheel["bytes"] for wheel in wheels),
        "carry_limit_bytes": CARRY_LIMIT_BYTES,
    }
    (wheel_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    problems = check(wheel_dir, python=GPU_PYTHON)
    if problems:
        raise WheelSetError("\n".join(problems))
    return manifest


def read_manifest(wheel_dir: Path) -> dict[str, Any]:
    path = wheel_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WheelSetError(
            f"{path}: no wheel manifest; run bench/gpu/prepare.sh (where pip reaches a registry)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WheelSetError(f"{path}: unreadable manifest: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("wheels"), list):
        raise WheelSetError(f"{path}: expected an object with a 'wheels' list")
    return manifest


def check(wheel_dir: Path, *, python: str | None = None, tree_bytes: int | None = None) -> list[str]:
    """Every problem of the set in ``wheel_dir`` against its manifest, as ``file: problem`` lines (empty when it
    installs): files missing, changed or not listed (pip would install them too), two versions of one distribution,
    a required one absent, a wheel the target interpreter (``python``, or this one) cannot take, and a carried total
    over the device tool's limit (``tree_bytes``: the rest of the working tree, when known)."""
    manifest = read_manifest(wheel_dir)
    where = wheel_dir / MANIFEST
    accepted = target_tags(python)
    problems = []
    listed = {}
    for index, entry in enumerate(manifest["wheels"]):
        if not isinstance(entry, dict) or not all(key in entry for key in ("file", "name", "bytes", "sha256")):
            problems.append(f"{where}: wheels[{index}]: expected file, name, bytes and sha256")
            continue
        listed[entry["file"]] = entry
        path = wheel_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
            continue
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            problems.append(f"{path}: differs from the manifest (size or sha256); rerun bench/gpu/prepare.sh")
        try:
            facts = wheel_facts(path)
        except WheelSetError as error:
            problems.append(str(error))
            continue
        if not accepted & set(facts["tags"]):
            target = f"CPython {python} manylinux x86-64" if python else f"this Python {sys.version.split()[0]}"
            problems.append(f"{path}: tags {', '.join(facts['tags'])} do not install on {target}")
    for path in sorted(wheel_dir.glob("*.whl")):
        if path.name not in listed:
            problems.append(f"{path}: not in the manifest (pip would install it too); remove it or rerun prepare.sh")
    names: dict[str, list[str]] = {}
    for entry in listed.values():
        names.setdefault(entry["name"], []).append(entry["file"])
    for name, files in names.items():
        if len(files) > 1:
            problems.append(f"{where}: {name}: more than one version ({', '.join(files)}); pip stops at two")
    problems += [f"{where}: required {name} has no wheel" for name in manifest.get("required", []) if name not in names]
    carried = sum(entry["bytes"] for entry in listed.values()) + (tree_bytes or 0)
    if carried > CARRY_LIMIT_BYTES:
        problems.append(
            f"{where}: {carried / 2**20:.1f} MiB would travel (wheels"
            + (" + working tree" if tree_bytes else "")
            + f"), over the device tool's {CARRY_LIMIT_BYTES / 2**20:.0f} MiB"
        )
    return problems


# ------------------------------------------------------------------------------------------------- install


def install_command(wheel_dir: Path, site: Path, *, dry_run: bool, python: str = sys.executable) -> list[str]:
    """The pip command that installs the manifest's wheels into ``site``; ``dry_run`` adds pip's cross-install flags
    so this machine's pip installs the GPU machine's (CPython 3.12, manylinux) wheels into a scratch directory."""
    manifest = read_manifest(wheel_dir)
    command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    command += ["--upgrade", "--target", str(site)]
    if dry_run:
        command += ["--python-version", GPU_PYTHON, "--implementation", "cp", "--only-binary=:all:"]
        command += ["--abi", "cp" + GPU_PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none"]
        for platform in GPU_PLATFORMS:
            command += ["--platform", platform]
    return command + [str(wheel_dir / entry["file"]) for entry in manifest["wheels"]]


def install(wheel_dir: Path, site: Path, *, dry_run: bool) -> dict[str, Any]:
    """Check, then run :func:`install_command`; returns what was done (for the results). ``dry_run`` installs into
    a temporary directory that is removed afterwards and checks that every wheel's top-level package landed."""
    problems = check(wheel_dir, python=GPU_PYTHON if dry_run else None)
    if problems:
        raise WheelSetError("\n".join(problems))
    scratch = Path(tempfile.mkdtemp(prefix="rmpl-wheels-dry-")) if dry_run else site
    command = install_command(wheel_dir, scratch, dry_run=dry_run)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise WheelSetError(f"{wheel_dir}: pip install failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}")
        installed = sorted(path.name for path in scratch.glob("*.dist-info"))
        expected = len(read_manifest(wheel_dir)["wheels"])
        if len(installed) != expected:
            raise WheelSetError(f"{wheel_dir}: {expected} wheels but {len(installed)} installed: {installed}")
    finally:
        if dry_run:
            shutil.rmtree(scratch, ignore_errors=True)
    shown = [part if not part.endswith(".whl") else Path(part).name for part in command]
    return {"dry_run": dry_run, "command": " ".join(shown), "installed": installed}


# ------------------------------------------------------------------------------------------------- bitsandbytes


def slim_wheel(path: Path, keep: list[str]) -> dict[str, Any]:
    """Rewrite a bitsandbytes wheel in place with only the native libraries named in ``keep`` (``cuda130``,
    ``cpu``...): the wheel ships one per CUDA/ROCm/XPU version (43 MB), the GPU machine loads the one matching its
    torch's CUDA. RECORD is rewritten for what stays, so the result is a valid wheel of the same version."""
    kept_libraries = {f"libbitsandbytes_{name}.so" for name in keep}
    dropped = []
    staging = path.with_suffix(".slim")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as target:
        record_name = next(name for name in source.namelist() if name.endswith(".dist-info/RECORD"))
        lines = []
        for info in source.infolist():
            base = Path(info.filename).name
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and base not in kept_libraries:
                dropped.append(base)
                continue
            if info.filename == record_name:
                continue
            data = source.read(info)
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        lines.append(f"{record_name},,")
        target.writestr(record_name, "\n".join(lines) + "\n")
    missing = kept_libraries - {Path(name).name for name in zipfile.ZipFile(staging).namelist()}
    if missing:
        staging.unlink()
        raise WheelSetError(f"{path}: has no {', '.join(sorted(missing))}")
    before = path.stat().st_size
    staging.replace(path)
    return {"file": path.name, "bytes_before": before, "bytes_after": path.stat().st_size, "dropped": sorted(dropped)}


# ------------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    slim = commands.add_parser("slim-bitsandbytes", help="keep only the named native libraries of a bnb wheel")
    slim.add_argument("wheel", type=Path)
    slim.add_argument("--keep", action="append", required=True, help="e.g. cuda130, cpu (repeat)")
    make = commands.add_parser("manifest", help="write WHEEL_DIR/manifest.json")
    make.add_argument("wheel_dir", type=Path)
    make.add_argument("--require", action="append", default=[], help="a distribution that must be in the set")
    make.add_argument("--note", action="append", default=[], metavar="NAME=TEXT", help="a note on one wheel")
    verify = commands.add_parser("check", help="check WHEEL_DIR against its manifest")
    verify.add_argument("wheel_dir", type=Path)
    verify.add_argument("--target-python", default=None, help="check for CPython X.Y manylinux (default: this Python)")
    setup = commands.add_parser("install", help="check, then pip install the set into --site")
    setup.add_argument("wheel_dir", type=Path)
    setup.add_argument("--site", type=Path, required=True)
    setup.add_argument("--dry-run", action="store_true", help="cross-install into a scratch dir (CPU smoke)")
    setup.add_argument("--json", type=Path, default=None, help="write what was done to this file")
    args = parser.parse_args(argv)
    try:
        if args.command == "slim-bitsandbytes":
            print(json.dumps(slim_wheel(args.wheel, args.keep)))
        elif args.command == "manifest":
            notes = dict(note.split("=", 1) for note in args.note)
            manifest = write_manifest(args.wheel_dir, args.require, notes)
            tree = travelling_tree_bytes()
            for wheel in manifest["wheels"]:
                print(f"  {wheel['bytes'] / 2**20:7.2f} MiB  {wheel['file']}")
            total = manifest["wheel_bytes"] + (tree or 0)
            print(
                f"  {manifest['wheel_bytes'] / 2**20:7.2f} MiB  wheels; working tree {(tree or 0) / 2**20:.2f} MiB; "
                f"{total / 2**20:.2f} MiB travel of the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB allowed"
            )
            problems = check(args.wheel_dir, python=GPU_PYTHON, tree_bytes=tree)
            if problems:
                raise WheelSetError("\n".join(problems))
        elif args.command == "check":
            problems = check(args.wheel_dir, python=args.target_python, tree_bytes=travelling_tree_bytes())
            if problems:
                raise WheelSetError("\n".join(problems))
            print(f"{args.wheel_dir}: {len(read_manifest(args.wheel_dir)['wheels'])} wheels match the manifest")
        else:
            done = install(args.wheel_dir, args.site, dry_run=args.dry_run)
            if args.json is not None:
                args.json.write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")
            print(("dry run: " if args.dry_run else "") + f"installed {len(done['installed'])} wheels")
    except WheelSetError as error:
        print(f"wheels.py {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
