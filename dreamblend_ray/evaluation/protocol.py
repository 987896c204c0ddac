"""The DreamBooth evaluation protocol: prompt templates and the evaluation subject list.

Prompt templates (``data/dreambooth_prompts.json``) are the DreamBooth benchmark's 25 prompts for
objects and 25 for live subjects (google/dreambooth, dataset/prompts_and_classes.txt), written with
``{token}`` (the identifier, e.g. "sks") and ``{class_noun}`` placeholders.

Subject list: JSON Lines, one subject per line::

    {"id": "dog", "class_noun": "dog", "kind": "live", "image_dir": "s3://bucket/dreambooth/dog"}

``id`` (``subject_id`` is accepted too) is the subject's id under the checkpoints root,
``kind`` is ``live`` or ``object`` (it selects the prompt set), ``image_dir`` a local directory
or s3:// prefix of the real subject images (png/jpg/jpeg/webp) used by CLIP-I and DINO.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from PIL import Image

from dreamblend_ray.io import storage
from dreamblend_ray.config import check_choice, validate_subject_id

KINDS = ("live", "object")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@lru_cache(maxsize=1)
def prompt_data() -> dict:
    """The parsed ``data/dreambooth_prompts.json`` (templates per kind and the 30 benchmark subjects)."""
    text = resources.files("dreamblend_ray").joinpath("data/dreambooth_prompts.json").read_text()
    return json.loads(text)


def templates(kind: str) -> list[str]:
    check_choice("kind", kind, KINDS)
    return list(prompt_data()[kind])


def fill(template: str, class_noun: str, token: str | None) -> str:
    """A template with its placeholders filled; ``token=None`` drops the identifier (for CLIP-T)."""
    text = template.format(token=token or "", class_noun=class_noun)
    return re.sub(r"\s+", " ", text).strip()


def prompts_for(kind: str, class_noun: str, token: str, limit: int | None = None
                ) -> tuple[list[str], list[str]]:
    """(prompts with the identifier, the same prompts without it) for one subject."""
    chosen = templates(kind)[:limit] if limit else templates(kind)
    return ([fill(t, class_noun, token) for t in chosen], [fill(t, class_noun, None) for t in chosen])


@dataclass(frozen=True)
class EvalSubject:
    """One line of the evaluation subject list."""

    id: str
    class_noun: str
    kind: str
    image_dir: str

    def __post_init__(self):
        validate_subject_id(self.id)
        if not isinstance(self.class_noun, str) or not self.class_noun.strip():
            raise ValueError(f"class_noun must be a non-empty string, got {self.class_noun!r}")
        check_choice("kind", self.kind, KINDS)
        if not isinstance(self.image_dir, str) or not self.image_dir:
            raise ValueError("image_dir must be a local directory or a remote URI (s3://, gs://, ...), "
                             f"got {self.image_dir!r}")

    @classmethod
    def from_dict(cls, row: dict) -> "EvalSubject":
        if not isinstance(row, dict):
            raise ValueError(f"a subject must be a JSON object, got {type(row).__name__}")
        row = dict(row)
        if "id" not in row and "subject_id" in row:
            row["id"] = row.pop("subject_id")
        missing = [k for k in ("id", "class_noun", "kind", "image_dir") if k not in row]
        if missing:
            raise ValueError(f"subject is missing {missing}; expected keys id, class_noun, kind, image_dir")
        unknown = sorted(set(row) - {"id", "class_noun", "kind", "image_dir"})
        if unknown:
            raise ValueError(f"subject {row['id']!r} has unknown keys {unknown}")
        return cls(**row)


def parse_subjects(text: str, source: str = "<subjects>") -> list[EvalSubject]:
    """Subjects from JSON Lines text; ValueError naming the line of the first bad entry."""
    subjects, seen = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            subject = EvalSubject.from_dict(json.loads(line))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ValueError(f"{source} line {number}: {exc}") from exc
        if subject.id in seen:
            raise ValueError(f"{source} line {number}: duplicate subject id {subject.id!r}")
        seen.add(subject.id)
        subjects.append(subject)
    if not subjects:
        raise ValueError(f"{source} lists no subjects")
    return subjects


def read_subjects(uri: str) -> list[EvalSubject]:
    """The subject list at a local path or s3:// URI (JSON Lines)."""
    return parse_subjects(storage.read_text(uri), source=uri)


def write_subjects(uri: str, subjects: list[EvalSubject]) -> None:
    lines = [json.dumps({"id": s.id, "class_noun": s.class_noun, "kind": s.kind,
                         "image_dir": s.image_dir}) for s in subjects]
    storage.write_text(uri, "\n".join(lines) + "\n")


def dreambooth_subjects(dataset_root: str) -> list[EvalSubject]:
    """The 30 DreamBooth benchmark subjects, with images under ``{dataset_root}/{id}``."""
    return [EvalSubject(id=s["id"], class_noun=s["class_noun"], kind=s["kind"],
                        image_dir=storage.join(dataset_root, s["id"]))
            for s in prompt_data()["subjects"]]


def load_images(image_dir: str) -> list[Image.Image]:
    """The RGB images directly under ``image_dir`` (sorted by name); ValueError when there are none."""
    try:
        names = sorted(n for n in storage.list_dir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
    except (FileNotFoundError, storage.StorageError, OSError) as exc:
        raise ValueError(f"image_dir {image_dir}: cannot list images: {exc}") from exc
    if not names:
        raise ValueError(f"image_dir {image_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return [Image.open(io.BytesIO(storage.read_bytes(storage.join(image_dir, n)))).convert("RGB")
            for n in names]
