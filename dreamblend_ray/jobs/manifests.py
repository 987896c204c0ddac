"""Input manifests of the batch jobs: subjects to fine-tune and generation requests.

Both are JSON Lines (``.jsonl``, one object per line; ``.json`` may also hold one list) or
Parquet (``.parquet``), read from a local path or ``s3://``. They are validated here, at the
edge, before any Ray work starts: a bad row raises ValueError naming the file, the row and the
field. Subject ids become storage keys, so they must match ``[A-Za-z0-9_-]{1,64}``.

Subjects manifest row::

    {"subject_id": "dog1", "class_noun": "dog",
     "images": ["dog1/0.png", "s3://bucket/dog1/1.png"] | "s3://bucket/dog1/",   # files or a folder
     "finetune": {"steps": 200, "learning_rate": 5e-5}}                          # optional overrides

Relative image paths are resolved against the manifest's own folder.

Generation requests row::

    {"subject_id": "dog1", "prompt": "a photo of sks dog on the beach", "seed": 0,
     "num_images": 2,                                        # seeds seed, seed+1, ...
     "settings": {"alpha": 0.3, "num_inference_steps": 30},  # SamplingConfig overrides
     "negative_prompt": null, "guidance_step": null, "edit_step": null}

``finetune`` and ``settings`` may also be JSON strings (handy in Parquet).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import pyarrow.parquet as pq

from dreamblend_ray.io import storage
from dreamblend_ray.config import (MAX_PROMPT_CHARS, MAX_SEED, SamplingConfig, check_range, validate_class_noun,
                                   validate_subject_id)

MAX_IMAGES_PER_ROW = 64


@dataclass(frozen=True)
class SubjectSpec:
    """One subject to fine-tune: its id, class noun, instance image URIs and config overrides."""

    subject_id: str
    class_noun: str
    images: tuple[str, ...]
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "subject_id", validate_subject_id(self.subject_id))
        validate_class_noun(self.class_noun)
        if not self.images or not all(isinstance(i, str) and i.strip() for i in self.images):
            raise ValueError(f"images must be a non-empty list of URIs, got {list(self.images)!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a generation job: ``num_images`` images of a subject for one prompt."""

    row: int
    subject_id: str
    prompt: str
    seed: int = 0
    num_images: int = 1
    settings: dict = field(default_factory=dict)
    negative_prompt: str | None = None
    guidance_step: int | None = None
    edit_step: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "subject_id", validate_subject_id(self.subject_id))
        _check_prompt("prompt", self.prompt)
        if self.negative_prompt is not None:
            _check_prompt("negative_prompt", self.negative_prompt, allow_empty=True)
        check_range("seed", self.seed, 0, MAX_SEED - MAX_IMAGES_PER_ROW, integer=True)
        check_range("num_images", self.num_images, 1, MAX_IMAGES_PER_ROW, integer=True)
        for name in ("guidance_step", "edit_step"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, 1_000_000, integer=True)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_images)]


def _check_prompt(name: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")


# --------------------------------------------------------------------------- reading rows

def read_rows(uri: str) -> list[dict]:
    """The raw rows of a JSONL/JSON/Parquet file; ValueError for unknown formats or bad JSON."""
    data = storage.read_bytes(uri)
    name = str(uri).lower()
    if name.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    if not name.endswith((".jsonl", ".json", ".ndjson")):
        raise ValueError(f"{uri}: manifests must be .jsonl, .json or .parquet")
    text = data.decode("utf-8")
    if name.endswith(".json") and text.lstrip().startswith("["):
        rows = _parse_json(uri, "the file", text)
        if not isinstance(rows, list):
            raise ValueError(f"{uri}: a .json manifest must hold a list of objects")
        return rows
    return [_parse_json(uri, f"line {n}", line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _parse_json(uri: str, where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri} {where}: not valid JSON ({exc})") from exc


def _mapping(value: Any, name: str) -> dict:
    """A dict from a dict, a JSON string or None; None values (Parquet struct padding) dropped."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object (or a JSON string of one), got {value!r}")
    return {k: v for k, v in value.items() if v is not None}


def _check_keys(row: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"each row must be an object, got {type(row).__name__}")
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(k for k in required if row.get(k) is None)
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    return row


def _resolve(image: str, base_dir: str) -> str:
    """Absolute image URIs pass; relative ones are taken from the manifest's folder."""
    if storage.scheme(image) or image.startswith(("/", "~")):
        return image
    if storage.is_remote(base_dir):
        return storage.join(base_dir, image)  # refuses ".." so keys stay under the manifest
    return os.path.normpath(os.path.join(storage.local_path(base_dir), image))


def _parent(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0] if "/" in str(uri) else "."


def _rows_checked(uri: str, parse) -> list:
    out = []
    for n, row in enumerate(read_rows(uri), 1):
        try:
            out.append(parse(n - 1, row))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{uri} row {n}: {exc}") from exc
    if not out:
        raise ValueError(f"{uri}: the manifest has no rows")
    return out


# --------------------------------------------------------------------------- subjects

def parse_subject(row: dict, base_dir: str = ".") -> SubjectSpec:
    row = _check_keys(row, {"subject_id", "class_noun", "images", "finetune"},
                      {"subject_id", "class_noun", "images"})
    images = row["images"]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a URI or a list of URIs, got {images!r}")
    if not all(isinstance(i, str) for i in images):
        raise ValueError(f"images must be strings, got {images!r}")
    return SubjectSpec(subject_id=row["subject_id"], class_noun=row["class_noun"],
                       images=tuple(_resolve(i, base_dir) for i in images),
                       overrides=_mapping(row.get("finetune"), "finetune"))


def read_subjects(uri: str) -> list[SubjectSpec]:
    """Validated subjects of a manifest; subject ids must be unique."""
    specs = _rows_checked(uri, lambda _, row: parse_subject(row, _parent(uri)))
    _check_unique(uri, [s.subject_id for s in specs])
    return specs


def _check_unique(uri: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for n, subject_id in enumerate(ids, 1):
        if subject_id in seen:
            raise ValueError(f"{uri} row {n}: duplicate subject_id {subject_id!r}")
        seen.add(subject_id)


def apply_overrides(config, overrides: dict, what: str = "finetune"):
    """``config`` (a config dataclass) with ``overrides`` of JSON values applied and validated once
    (lists become tuples, a nested ``layers`` object its dataclass); ValueError names bad keys/values."""
    names = sorted(f.name for f in fields(config) if f.init)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; allowed: {names}")
    return replace(config, **overrides)


# --------------------------------------------------------------------------- generation requests

REQUEST_FIELDS = {"subject_id", "prompt", "seed", "num_images", "settings", "negative_prompt",
                  "guidance_step", "edit_step"}


def parse_request(row_index: int, row: dict) -> GenerationRequest:
    row = _check_keys(row, REQUEST_FIELDS, {"subject_id", "prompt"})
    optional = {k: row[k] for k in ("seed", "num_images", "negative_prompt", "guidance_step", "edit_step")
                if row.get(k) is not None}
    return GenerationRequest(row=row_index, subject_id=row["subject_id"], prompt=row["prompt"],
                             settings=_mapping(row.get("settings"), "settings"), **optional)


def read_requests(uri: str, base: SamplingConfig | None = None) -> list[GenerationRequest]:
    """Validated generation requests; each row's settings are checked against SamplingConfig."""
    return load_requests(uri, base)[0]


def load_requests(uri: str, base: SamplingConfig | None = None) -> tuple[list[GenerationRequest],
                                                                          list[SamplingConfig]]:
    """The validated requests of ``uri`` and, for each, its SamplingConfig (``base`` with the
    row's settings), built once here."""
    requests = _rows_checked(uri, parse_request)
    return requests, request_configs(requests, base or SamplingConfig(), f"{uri} ")


def request_configs(requests: list[GenerationRequest], base: SamplingConfig, where: str = "") -> list[SamplingConfig]:
    """Each request's SamplingConfig: ``base`` with its settings (ValueError naming the row)."""
    configs = []
    for request in requests:
        try:
            configs.append(sampling_config(base, request.settings) if request.settings else base)
        except ValueError as exc:
            raise ValueError(f"{where}row {request.row + 1}: {exc}") from exc
    return configs


def sampling_config(base: SamplingConfig, settings: dict) -> SamplingConfig:
    """``base`` with a request's settings (JSON values; ``layers`` may be an object)."""
    return apply_overrides(base, settings, "settings")
