"""The ``--base`` of the commands that sample a subject (``dreamblend generate``, ``attention``).

By default the base is the one the subject was fine-tuned on, as its ``subject.json`` records
(``base.source``: a built-in name such as ``tiny-sdxl`` or ``embedded``, a storage URI, or the
local diffusers folder it was loaded from), so a subject of any base works without the flag. An
explicit ``--base`` wins; a checkpoint pair given by URIs has no manifest and keeps the jobs'
default base (``embedded``).

Light on purpose (argparse only at import), as ``dreamblend --help`` imports it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dreamblend_ray.jobs.flags import DEFAULT_BASE

logger = logging.getLogger(__name__)


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    """``--base``, defaulting to None: :func:`resolve_base_arg` picks the subject's own base."""
    parser.add_argument("--base", default=None,
                        help="base model: tiny, tiny-sd2, tiny-sdxl, embedded, a diffusers folder or a storage URI "
                             "(s3://, gs://, ...) holding one (default: the base the subject's subject.json records "
                             f"with --checkpoints/--subject-id; {DEFAULT_BASE} with --guidance-ckpt/--edit-ckpt)")


def base_from_manifest(manifest: dict) -> str:
    """A ``--base`` value that loads the base a validated subject manifest records; ValueError
    (saying to pass --base) when it cannot be loaded from here, e.g. a local folder since removed."""
    # Deferred: models.components and io.storage import torch and pyarrow; `--help` must stay instant.
    from dreamblend_ray.io import storage
    from dreamblend_ray.models.components import BUILTIN_BASES

    source = manifest["base"]["source"]
    if source in BUILTIN_BASES or storage.is_remote(source):
        return source
    path = Path(source).expanduser()
    if (path / "model_index.json").is_file():
        return str(path)
    reason = "that folder holds no model_index.json" if path.exists() else "no folder of that name exists here"
    raise ValueError(f"subject {manifest['subject_id']!r} was fine-tuned on base {source!r}, which is neither a "
                     f"built-in model nor a storage URI, and {reason}; pass --base with that model (a diffusers "
                     "folder or a storage URI)")


def resolve_base_arg(args: argparse.Namespace) -> str:
    """``args.base`` if given; else the base of the subject ``--checkpoints``/``--subject-id``
    names (read from its manifest); else the default base."""
    if args.base is not None:
        return args.base
    if not (args.checkpoints and args.subject_id):
        return DEFAULT_BASE
    # Deferred: training.layout imports pyarrow (through io.storage).
    from dreamblend_ray.training.layout import read_manifest

    base = base_from_manifest(read_manifest(args.checkpoints, args.subject_id))
    logger.info("--base %s: the base subject %r was fine-tuned on (its subject.json)", base, args.subject_id)
    return base
