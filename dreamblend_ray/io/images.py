"""Images to and from bytes: the one PNG encoder, and a checked decoder for stored images."""

from __future__ import annotations

import io

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    """``image`` as PNG file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, name: str) -> Image.Image:
    """An RGB image from file bytes; ValueError naming ``name`` if they are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"{name} is not a readable image ({exc})") from exc
