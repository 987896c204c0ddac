"""Uploaded instance images, checked before anything is queued or stored.

Every file must decode as one of the allowed formats (by content, never by its name), within limits
on bytes per file, total bytes, file count, pixels per image and the shorter side. A refused file
raises :class:`UploadError`, which names the file (sanitised) and the rule it broke, so the HTTP
layer can answer a 4xx with both; nothing of the file's contents is ever echoed.

An accepted image comes back re-encoded: EXIF orientation applied, converted to RGB, written as a
PNG without metadata (no EXIF, GPS, text chunks or ICC profile). A streaming receiver reads each
part with :func:`read_limited` (or :meth:`UploadBatch.add_stream`), so it never buffers more than
the limit of one file, and stops at the first file over a limit::

    batch = UploadBatch(UploadLimits())
    for part in parts:
        batch.add_stream(part.filename, part.file)
    images = batch.finish()

Pillow and the standard library only: this is the bottom layer.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
READ_CHUNK_BYTES = MIB  # read_limited's chunk: a bound on what one read() call may return
MAX_FILENAME_CHARS = 100
UNNAMED = "unnamed"
RULES = ("count", "file_bytes", "total_bytes", "not_an_image", "truncated", "format", "pixels", "min_side")
# Pillow names a JPEG with a multi-picture (MPF) segment, as many cameras write, "MPO".
FORMAT_ALIASES = {"MPO": "JPEG"}
# warnings.catch_warnings swaps the process-wide filter list; two threads inside it at once could
# leave our "error" filter installed for good. Only Image.open runs under it (header parsing).
_WARNINGS_LOCK = threading.Lock()


def safe_filename(filename: str | None) -> str:
    """A client's file name fit for messages and logs: its last path component, printable
    characters only, at most 100 of them; ``unnamed`` when nothing (or ``.``/``..``) is left."""
    name = str(filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:MAX_FILENAME_CHARS]
    return UNNAMED if name in ("", ".", "..") else name


class UploadError(ValueError):
    """An upload broke a rule. ``filename`` is sanitised (:func:`safe_filename`; None for the batch
    as a whole), ``rule`` one of :data:`RULES`; the message names both, never the file's contents."""

    def __init__(self, filename: str | None, rule: str, detail: str):
        if rule not in RULES:
            raise ValueError(f"unknown upload rule {rule!r}; rules are {list(RULES)}")
        self.filename = None if filename is None else safe_filename(filename)
        self.rule = rule
        self.detail = detail
        subject = "the upload" if self.filename is None else f"file {self.filename!r}"
        super().__init__(f"{subject} is refused by rule {rule!r}: {detail}")


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold. ``max_pixels`` bounds every image's declared width x height before
    any pixel is decoded, whatever Pillow's own ``Image.MAX_IMAGE_PIXELS`` is set to."""

    max_files: int = field(default=20, metadata={"help": "files per upload, at most"})
    min_files: int = field(default=1, metadata={"help": "files per upload, at least"})
    max_file_bytes: int = field(default=10 * MIB, metadata={"help": "bytes per file, at most"})
    max_total_bytes: int = field(default=50 * MIB, metadata={"help": "bytes of all files together, at most"})
    max_pixels: int = field(default=16_000_000, metadata={"help": "width x height per image, at most"})
    min_side: int = field(default=64, metadata={"help": "shorter side in pixels (after EXIF rotation), at least"})
    formats: tuple[str, ...] = field(default=("PNG", "JPEG", "WEBP"),
                                     metadata={"help": "Pillow format names accepted, read from the content"})

    def __post_init__(self):
        for name in ("max_files", "min_files", "max_file_bytes", "max_total_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"upload limit {name} must be a positive integer, got {value!r}")
        if self.min_files > self.max_files:
            raise ValueError(f"upload limit min_files ({self.min_files}) exceeds max_files ({self.max_files})")
        object.__setattr__(self, "formats", _check_formats(self.formats))


def _check_formats(formats) -> tuple[str, ...]:
    """``formats`` as a tuple of upper-case Pillow format names Pillow can open."""
    if isinstance(formats, str) or not formats or not all(isinstance(f, str) for f in formats):
        raise ValueError(f"upload limit formats must be a non-empty list of format names, got {formats!r}")
    Image.init()
    names = tuple(f.upper() for f in formats)
    unknown = [f for f in names if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"upload limit formats names formats Pillow cannot open: {unknown}")
    return names


@dataclass(frozen=True)
class ValidatedImage:
    """An accepted image: its sanitised file name, size and format as uploaded (after EXIF
    rotation), and ``png``, the decoded RGB pixels re-encoded as a PNG without metadata."""

    filename: str
    width: int
    height: int
    format: str
    png: bytes = field(repr=False)


def read_limited(stream: BinaryIO, max_bytes: int, filename: str) -> bytes:
    """All of ``stream`` (a binary file-like), read in chunks; UploadError ``file_bytes`` as soon
    as more than ``max_bytes`` arrive, so at most ``max_bytes + 1`` bytes are ever held."""
    chunks, size = [], 0
    while True:
        chunk = stream.read(min(READ_CHUNK_BYTES, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise UploadError(filename, "file_bytes", f"it is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)


def validate_image(filename: str, data: bytes, limits: UploadLimits) -> ValidatedImage:
    """Check one uploaded file and return it re-encoded; UploadError naming the rule otherwise.

    In order: bytes (``file_bytes``); the header, read lazily by ``Image.open`` (``not_an_image``;
    Pillow's decompression-bomb error or warning: ``pixels``); the format found in the content
    (``format``); the declared width x height against ``limits.max_pixels`` (``pixels``), all
    before a pixel is decoded; then decoding (``truncated``), EXIF orientation
    (``ImageOps.exif_transpose``) and the shorter side (``min_side``). The result is converted to
    RGB and re-encoded as a PNG with no metadata: EXIF (GPS included), text chunks and ICC
    profiles are stripped, so no location or camera data is ever stored.
    """
    name = safe_filename(filename)
    if len(data) > limits.max_file_bytes:
        raise UploadError(name, "file_bytes", f"it has {len(data)} bytes, over the limit of {limits.max_file_bytes}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process: uploads cannot be "
                           "checked for truncation; leave it False")
    with _open_header(name, data) as image:
        image_format = _check_header(name, image, limits)
        _decode(name, image)
        rgb = _upright_rgb(name, image)
    if min(rgb.size) < limits.min_side:
        raise UploadError(name, "min_side", f"it is {rgb.width}x{rgb.height} pixels; the shorter side must be "
                                            f"at least {limits.min_side}")
    rgb.info.clear()  # nothing of the original's metadata reaches the encoder
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return ValidatedImage(name, rgb.width, rgb.height, image_format, buffer.getvalue())


def _open_header(name: str, data: bytes) -> Image.Image:
    """``Image.open`` (header only), with Pillow's decompression-bomb warning as an error."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(name, "pixels", "its declared size is over Pillow's decompression-bomb limit") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        logger.debug("upload %r: Image.open failed: %s", name, exc)
        raise UploadError(name, "not_an_image", "it is not a readable image") from exc


def _check_header(name: str, image: Image.Image, limits: UploadLimits) -> str:
    """The image's format, if allowed and its declared pixels are within the limit."""
    image_format = FORMAT_ALIASES.get(image.format, image.format)
    if image_format not in limits.formats:
        raise UploadError(name, "format", f"it is a {image.format} image; accepted formats are "
                                          f"{', '.join(limits.formats)}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise UploadError(name, "pixels", f"it declares {width}x{height} = {width * height} pixels, over the "
                                          f"limit of {limits.max_pixels}")
    return image_format


def _decode(name: str, image: Image.Image) -> None:
    """Decode the pixels (the size is checked already); a short or broken stream is ``truncated``."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise UploadError(name, "pixels", "it is over Pillow's decompression-bomb limit") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        logger.debug("upload %r: decoding failed: %s", name, exc)
        raise UploadError(name, "truncated", "its image data is truncated or damaged") from exc


def _upright_rgb(name: str, image: Image.Image) -> Image.Image:
    """The decoded image turned upright by its EXIF orientation, as RGB."""
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as exc:
        logger.debug("upload %r: EXIF orientation or RGB conversion failed: %s", name, exc)
        raise UploadError(name, "not_an_image", "its EXIF data or pixel mode cannot be read") from exc


class UploadBatch:
    """The files of one upload, checked as they arrive: count and total bytes before each file is
    decoded, so a streaming receiver can stop at the first file over a limit. ``keep_images=False``
    checks without keeping the re-encoded images (a server then re-reads each file to store it, so
    it never holds the whole upload in memory)."""

    def __init__(self, limits: UploadLimits | None = None, keep_images: bool = True):
        self.limits = limits or UploadLimits()
        self.keep_images = keep_images
        self.images: list[ValidatedImage] = []
        self.count = 0
        self.total_bytes = 0

    @property
    def remaining_bytes(self) -> int:
        """Bytes the rest of the upload may still hold."""
        return self.limits.max_total_bytes - self.total_bytes

    def _check_count(self, filename: str) -> None:
        if self.count >= self.limits.max_files:
            raise UploadError(filename, "count", f"an upload holds at most {self.limits.max_files} files")

    def add(self, filename: str, data: bytes) -> ValidatedImage:
        """Check the count, the running total and the file itself; keep and return the image."""
        self._check_count(filename)
        if len(data) > self.remaining_bytes:
            raise UploadError(filename, "total_bytes", f"the files together exceed the limit of "
                                                       f"{self.limits.max_total_bytes} bytes")
        image = validate_image(filename, data, self.limits)
        if self.keep_images:
            self.images.append(image)
        self.count += 1
        self.total_bytes += len(data)
        return image

    def add_stream(self, filename: str, stream: BinaryIO) -> ValidatedImage:
        """:meth:`add` for a file-like: never reads past the per-file or the remaining total limit."""
        self._check_count(filename)
        limit = min(self.limits.max_file_bytes, self.remaining_bytes)
        try:
            data = read_limited(stream, limit, filename)
        except UploadError as exc:
            if limit < self.limits.max_file_bytes:
                raise UploadError(filename, "total_bytes", f"the files together exceed the limit of "
                                                           f"{self.limits.max_total_bytes} bytes") from exc
            raise
        return self.add(filename, data)

    def finish(self) -> list[ValidatedImage]:
        """The accepted images; UploadError ``count`` if fewer than ``limits.min_files``."""
        if self.count < self.limits.min_files:
            raise UploadError(None, "count", f"it holds {self.count} images; at least "
                                             f"{self.limits.min_files} are required")
        return list(self.images)
