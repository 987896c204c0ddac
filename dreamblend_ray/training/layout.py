"""Where a subject's files live under an output root, and its manifest's schema.

Layout under an output root (a local path or ``s3://bucket/prefix``)::

    {root}/subjects/{id}/checkpoints/step-{N}/pytorch_lora_weights.safetensors   (LoRA runs)
    {root}/subjects/{id}/checkpoints/step-{N}/unet.safetensors                   (full fine-tunes)
    {root}/subjects/{id}/subject.json        (the manifest, written LAST)
    {root}/subjects/{id}/collapse.png        (the attention probe's plot, when probed)
    {root}/class_images/{base_config_sha256[:12]}/{class_noun}/NNNN.png   (prior-preservation cache)

A tenant other than ``default`` has the same layout under ``{root}/tenants/{tenant}/``
(``tenant_root``); the default tenant's is the root itself.

A manifest's presence means every checkpoint it lists was written: ``finetune_subject`` removes
any old manifest before it writes a checkpoint and writes the new one after the last.
What a weight file holds, and loading it onto a UNet, is ``dreamblend_ray.training.checkpoints``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from dreamblend_ray.config import DEFAULT_TENANT, SUBJECT_ID_PATTERN, to_dict, validate_subject_id, validate_tenant
from dreamblend_ray.io import storage

MANIFEST_VERSION = 1
MANIFEST_NAME = "subject.json"
COLLAPSE_PLOT_NAME = "collapse.png"  # the attention probe's collapse-vs-step plot
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FULL_WEIGHT_NAME = "unet.safetensors"
WEIGHT_NAMES = {"lora": LORA_WEIGHT_NAME, "full": FULL_WEIGHT_NAME}
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- layout

def tenant_root(root: str, tenant: str = DEFAULT_TENANT) -> str:
    """Where a tenant's subjects, runs and jobs live: the root itself for ``default`` (so a
    single-tenant store is the default tenant's, with no copying), ``{root}/tenants/{tenant}``
    for any other."""
    tenant = validate_tenant(tenant)
    return root if tenant == DEFAULT_TENANT else storage.join(root, "tenants", tenant)


def subject_uri(root: str, subject_id: str) -> str:
    return storage.join(root, "subjects", validate_subject_id(subject_id))


def checkpoint_uri(root: str, subject_id: str, step: int) -> str:
    """The directory of one checkpoint (what ``pipe.load_lora_weights`` takes)."""
    return storage.join(subject_uri(root, subject_id), "checkpoints", f"step-{int(step)}")


def manifest_uri(root: str, subject_id: str) -> str:
    return storage.join(subject_uri(root, subject_id), MANIFEST_NAME)



def weight_uri(root: str, subject_id: str, step: int, kind: str) -> str:
    return storage.join(checkpoint_uri(root, subject_id, step), WEIGHT_NAMES[kind])


def collapse_plot_uri(root: str, subject_id: str) -> str:
    """The attention probe's plot, ``subjects/{id}/collapse.png`` (``evaluation.collapse``)."""
    return storage.join(subject_uri(root, subject_id), COLLAPSE_PLOT_NAME)


def list_subject_ids(root: str, after: str | None = None, limit: int | None = None) -> list[str]:
    """Sorted ids of the complete subjects (a subject.json present) under ``root``: those after
    ``after`` (a cursor: the last id of the previous page), at most ``limit``.

    One listing of ``subjects/``, then one stat per candidate until ``limit`` are found.
    """
    found = []
    for name in storage.list_dir(storage.join(root, "subjects")):
        if limit is not None and len(found) >= limit:
            break
        if SUBJECT_ID_PATTERN.fullmatch(name) and (after is None or name > after) \
                and storage.exists(manifest_uri(root, name)):
            found.append(name)
    return found


def class_images_uri(root: str, config_sha256: str, class_dir: str) -> str:
    return storage.join(root, "class_images", config_sha256[:12], class_dir)


def checkpoint_kind(uri: str) -> str:
    """``"lora"`` or ``"full"``: which weight file the checkpoint directory ``uri`` holds."""
    for kind, name in WEIGHT_NAMES.items():
        if storage.exists(storage.join(uri, name)):
            return kind
    raise FileNotFoundError(f"{uri}: no {' or '.join(WEIGHT_NAMES.values())} (is it a checkpoint directory?)")


def base_name(source: str) -> str:
    """A base model's name without its location: the last part of its path or URI."""
    return str(source).rstrip("/").rsplit("/", 1)[-1] or "unknown"


# --------------------------------------------------------------------------- manifest

def _field_error(name: str, problem: str, value: Any) -> ValueError:
    return ValueError(f"subject manifest field {name!r} {problem}, got {value!r}")


def _require(manifest: dict, name: str, kind: type | tuple) -> Any:
    if name not in manifest:
        raise ValueError(f"subject manifest field {name!r} is missing")
    value = manifest[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _field_error(name, f"must be of type {getattr(kind, '__name__', kind)}", value)
    return value


def validate_manifest(manifest: Any) -> dict:
    """Check a subject manifest; raise ValueError naming the first malformed field."""
    if not isinstance(manifest, dict):
        raise ValueError(f"a subject manifest must be a JSON object, got {type(manifest).__name__}")
    if _require(manifest, "version", int) != MANIFEST_VERSION:
        raise _field_error("version", f"must be {MANIFEST_VERSION}", manifest["version"])
    try:
        validate_subject_id(_require(manifest, "subject_id", str))
    except ValueError as exc:
        raise _field_error("subject_id", "must match [A-Za-z0-9_-]{1,64}", manifest["subject_id"]) from exc
    for name in ("class_noun", "token", "instance_prompt"):
        if not _require(manifest, name, str):
            raise _field_error(name, "must be non-empty", "")
    base = _require(manifest, "base", dict)
    if not isinstance(base.get("source"), str):
        raise _field_error("base.source", "must be a string", base.get("source"))
    if not isinstance(base.get("config_sha256"), str) or not SHA256_PATTERN.fullmatch(base["config_sha256"]):
        raise _field_error("base.config_sha256", "must be 64 lowercase hex digits", base.get("config_sha256"))
    if "family" in base and (not isinstance(base["family"], str) or not base["family"]):
        raise _field_error("base.family", "must be a non-empty string (a model family name)", base["family"])
    if _require(manifest, "kind", str) not in WEIGHT_NAMES:
        raise _field_error("kind", f"must be one of {sorted(WEIGHT_NAMES)}", manifest["kind"])
    steps = _require(manifest, "steps", list)
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps) \
            or steps != sorted(set(steps)):
        raise _field_error("steps", "must be a non-empty increasing list of positive integers", steps)
    for name in ("guidance_step", "edit_step"):
        if _require(manifest, name, int) not in steps:
            raise _field_error(name, f"must be one of the saved steps {steps}", manifest[name])
    curve = _require(manifest, "loss_curve", list)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in curve):
        raise _field_error("loss_curve", "must be a list of numbers", curve[:5])
    for name in ("config", "timings", "library_versions"):
        _require(manifest, name, dict)
    return manifest


class PairConflict(ValueError):
    """A request that does not fit the subject as saved: a step that was not saved, or another base
    model than the one it was fine-tuned from. Its message is fit for the client (no paths)."""


def resolve_steps(manifest: dict, guidance_step: int | None, edit_step: int | None) -> tuple[int, int]:
    """G's and E's steps: the manifest's recorded pair unless given; either must be a saved step."""
    g = manifest["guidance_step"] if guidance_step is None else guidance_step
    e = manifest["edit_step"] if edit_step is None else edit_step
    for name, step in (("guidance_step", g), ("edit_step", e)):
        if step not in manifest["steps"]:
            raise PairConflict(f"{name} {step!r} is not a saved checkpoint of subject "
                             f"{manifest['subject_id']!r} (saved: {manifest['steps']})")
    return g, e


def write_manifest(root: str, subject_id: str, manifest: dict) -> str:
    """Validate and write ``subject.json`` (call only after every checkpoint is written)."""
    validate_manifest(manifest)
    if manifest["subject_id"] != subject_id:
        raise _field_error("subject_id", f"must equal {subject_id!r}", manifest["subject_id"])
    uri = manifest_uri(root, subject_id)
    storage.write_json(uri, manifest)
    return uri


class ManifestError(ValueError):
    """A subject's stored manifest is damaged: not UTF-8 JSON, malformed, or another subject's.
    The message names the URI (for logs and the CLI; the HTTP layer answers without it)."""


def read_manifest(root: str, subject_id: str) -> dict:
    """The validated manifest; FileNotFoundError if the subject has none (absent or incomplete),
    ManifestError if it is damaged."""
    uri = manifest_uri(root, subject_id)
    try:
        manifest = json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{uri} is not valid JSON: {exc}") from exc
    try:
        validate_manifest(manifest)
    except ValueError as exc:
        raise ManifestError(f"{uri}: {exc}") from exc
    if manifest["subject_id"] != subject_id:
        raise ManifestError(f"{uri}: subject manifest field 'subject_id' is {manifest['subject_id']!r}, "
                            f"expected {subject_id!r}")
    return manifest


def is_complete(root: str, subject_id: str) -> bool:
    """Whether the subject has a manifest, i.e. a complete checkpoint pair."""
    return storage.exists(manifest_uri(root, subject_id))


def finetuned_with(root: str, subject_id: str, config) -> bool:
    """Whether the subject is complete and its manifest records exactly ``config`` (a FinetuneConfig)."""
    return is_complete(root, subject_id) and read_manifest(root, subject_id).get("config") == to_dict(config)
