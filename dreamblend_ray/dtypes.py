"""The one vocabulary of weight dtypes, for every command, job, Serve argument and config.

Names are ``fp32``, ``fp16`` and ``bf16``; torch's names ``float32``, ``float16`` and ``bfloat16``
are accepted as aliases and normalised to them (case-insensitive), so ``--dtype bfloat16`` and
``--dtype bf16`` mean the same everywhere. ``None`` means "per device": fp32 on CPU, bf16 on GPUs
that support it, else fp16 (``components.select_dtype``).

This module imports nothing heavy, so argument parsers can use it without importing torch.
"""

from __future__ import annotations

import argparse

DTYPES = ("fp32", "fp16", "bf16")
ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ACCEPTED = DTYPES + tuple(ALIASES)
HELP = "weights dtype: fp32, fp16 or bf16 (or float32, float16, bfloat16); default fp32 on CPU, bf16/fp16 on GPU"


def normalize_dtype(name: str | None) -> str | None:
    """The canonical name (``fp32``/``fp16``/``bf16``) of ``name``, None for None; ValueError otherwise."""
    if name is None:
        return None
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key in DTYPES:
        return key
    if isinstance(key, str) and key in ALIASES:
        return ALIASES[key]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or {', '.join(ALIASES)}), got {name!r}")


def dtype_argument(text: str) -> str:
    """An argparse ``type``: the canonical name, or a usage error listing the choices."""
    try:
        return normalize_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_dtype_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str = "--dtype",
                       help: str = HELP) -> None:
    """``--dtype`` with the one vocabulary (default None: per device)."""
    parser.add_argument(flag, default=None, type=dtype_argument, metavar="{" + ",".join(DTYPES) + "}", help=help)


def torch_dtype(name: str):
    """The torch dtype of a name or alias."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[normalize_dtype(name)]


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def normalize_mixed_precision(value: str) -> str:
    """FinetuneConfig.mixed_precision: "auto", "no", or a half dtype of the vocabulary above
    (``fp32``/``float32`` mean no mixed precision, i.e. "no")."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "no"):
        return value.strip().lower()
    try:
        name = normalize_dtype(value)
    except ValueError:
        name = None
    if name is None:
        raise ValueError(f"mixed_precision must be one of auto, no, {', '.join(DTYPES)} "
                         f"(or {', '.join(ALIASES)}), got {value!r}")
    return "no" if name == "fp32" else name


def mixed_precision_argument(text: str) -> str:
    """An argparse ``type`` for ``--mixed-precision``."""
    try:
        return normalize_mixed_precision(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
