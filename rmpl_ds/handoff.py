"""The hand-off between stages: an exported HF directory plus a manifest the next stage verifies.

A stage ends by exporting ``<stage dir>/export/``: merged weights (a normal HF model directory) or a PEFT
adapter plus a reference to its base model, by recipe. ``rmpl_export.json`` records the lineage fingerprint
(model, sources and every stage up to this one), the step, the export kind and the sha256 of every file.
The directory is written under a temporary name and renamed when complete, so an export is whole or absent.

A stage with ``init_from: <stage>`` calls :func:`verify_export` before loading: a missing export, an
incomplete or modified one, or one produced by a different recipe is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rmpl_ds import atomic
from rmpl_ds.checkpoint import file_hashes
from rmpl_ds.config import Recipe, fingerprint, fingerprinted
from rmpl_ds.errors import UserError

MANIFEST = "rmpl_export.json"
EXPORT_DIR = "export"


def lineage(recipe: Recipe, stage_name: str) -> list[str]:
    """The stage and its ancestors through ``init_from``, oldest first."""
    chain = [stage_name]
    while (parent := recipe.stage(chain[-1]).init_from) is not None:
        chain.append(parent)
    return chain[::-1]


def lineage_fingerprint(recipe: Recipe, stage_name: str) -> str:
    """What an export of ``stage_name`` depends on: the base model, the sources, how targets are written and its
    stages' settings (options added later left out at their defaults: :func:`~rmpl_ds.config.fingerprinted`)."""
    stages = [fingerprinted(recipe.stage(name)) for name in lineage(recipe, stage_name)]
    tasks = fingerprinted(recipe.tasks)
    return fingerprint({"model": recipe.model, "sources": recipe.sources, "tasks": tasks, "stages": stages})


def export_path(stage_dir: Path) -> Path:
    return stage_dir / EXPORT_DIR


def write_export(
    stage_dir: Path,
    write_model: Callable[[Path], None],
    *,
    recipe: Recipe,
    stage_name: str,
    step: int,
    kind: str,
    base_model: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export atomically: ``write_model(tmp_dir)`` writes the model files, then the manifest seals them."""
    final = export_path(stage_dir)
    try:
        with atomic.directory(final, replace=True) as staging:
            write_model(staging)
            weights = {"weights_digest": weights_digest(export_tensors(staging).values())} if kind == "merged" else {}
            manifest = {
                **weights,
                "stage": stage_name,
                "step": step,
                "kind": kind,
                "base_model": base_model,
                "lineage": lineage(recipe, stage_name),
                "fingerprint": lineage_fingerprint(recipe, stage_name),
                "box_format": recipe.tasks.box_format,
                "schema_guided": recipe.tasks.schema_guided,
                "files": file_hashes(staging, exclude=MANIFEST),
                **(extra or {}),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write the export {final}: {error.strerror or error}") from error
    return final


def weights_digest(tensors: Iterable[Any]) -> str:
    """sha256 over the set of per-tensor digests (dtype, shape, bytes), in sorted order.

    Names are left out on purpose: transformers saves checkpoints under other names than a live model's
    ``state_dict`` (and ties some weights), but the set of tensors is the same. Computed on an export's files
    and on the model a stage loaded from it, equal digests show that the next stage starts from exactly the
    previous stage's final weights.
    """
    digests = set()
    for tensor in tensors:
        tensor = tensor.detach().contiguous().cpu()
        digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        digests.add(digest.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def export_tensors(directory: Path) -> dict[str, Any]:
    """All tensors of an export's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def loaded_base_weights(model: Any) -> list[Any]:
    """The base weights of a (possibly LoRA-wrapped) model: everything but the adapter's own tensors."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [
        tensor for name, tensor in base.state_dict().items() if "lora_" not in name and "modules_to_save" not in name
    ]


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory}: not a complete export (no {MANIFEST}); did the stage finish?") from None
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable export manifest: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: malformed export manifest")
    return manifest


def verify_export(directory: Path, recipe: Recipe, stage_name: str) -> dict[str, Any]:
    """Check that ``directory`` is a complete, unmodified export of ``stage_name`` of this recipe.

    Returns the manifest; raises UserError with the reason otherwise.
    """
    if not directory.is_dir():
        raise UserError(f"{directory}: the export of stage {stage_name!r} does not exist; run that stage first")
    manifest = read_manifest(directory)
    if manifest.get("stage") != stage_name:
        raise UserError(f"{directory}: this is an export of stage {manifest.get('stage')!r}, not {stage_name!r}")
    expected = lineage_fingerprint(recipe, stage_name)
    if manifest.get("fingerprint") != expected:
        raise UserError(
            f"{directory}: exported by a different recipe (fingerprint {str(manifest.get('fingerprint'))[:12]}, "
            f"this recipe's is {expected[:12]}): the model, sources or settings of {manifest.get('lineage')} changed; "
            "re-run that stage or point init_from at the right one"
        )
    actual = file_hashes(directory, exclude=MANIFEST)
    for name in sorted(set(manifest["files"]) | set(actual)):
        if manifest["files"].get(name) != actual.get(name):
            what = (
                "missing"
                if name not in actual
                else "not in the manifest"
                if name not in manifest["files"]
                else "modified"
            )
            raise UserError(f"{directory / name}: {what} (a partial or altered export); re-run stage {stage_name!r}")
    return manifest
