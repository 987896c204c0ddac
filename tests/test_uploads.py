"""io.uploads: every uploaded file is decoded and checked (bytes, count, pixels, sides, format) before
anything is stored; a refusal names the file and the rule; accepted images lose their metadata."""

import io
import struct
import time
import warnings
import zlib

import pytest
from PIL import ExifTags, Image, ImageFile

from dreamblend_ray.io.uploads import (
    RULES, UploadBatch, UploadError, UploadLimits, ValidatedImage, read_limited, safe_filename, validate_image,
)

LIMITS = UploadLimits()


def image_bytes(fmt: str, size=(96, 80), exif: Image.Exif | None = None, color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    kwargs = {"exif": exif.tobytes()} if exif is not None else {}
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is patched to declare ``width`` x ``height`` (its CRC recomputed)."""
    data = bytearray(image_bytes("PNG", size=(1, 1)))
    start = 8 + 4  # signature, then the IHDR chunk's length; its type and data follow
    ihdr = bytearray(data[start:start + 4 + 13])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[start:start + 17] = ihdr
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def refused(rule: str, filename: str, data: bytes, limits: UploadLimits = LIMITS) -> UploadError:
    with pytest.raises(UploadError) as info:
        validate_image(filename, data, limits)
    assert info.value.rule == rule, str(info.value)
    assert info.value.filename == safe_filename(filename) and info.value.filename in str(info.value)
    assert rule in str(info.value)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_valid_images_come_back_as_rgb_png(fmt):
    image = validate_image(f"cat.{fmt.lower()}", image_bytes(fmt), LIMITS)
    assert isinstance(image, ValidatedImage)
    assert (image.filename, image.width, image.height, image.format) == (f"cat.{fmt.lower()}", 96, 80, fmt)
    decoded = Image.open(io.BytesIO(image.png))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (96, 80)
    assert "png=" not in repr(image)  # the bytes stay out of logs


def test_format_is_read_from_the_content_not_the_name():
    assert validate_image("photo.png", image_bytes("JPEG"), LIMITS).format == "JPEG"
    refused("format", "anim.png", image_bytes("GIF"))
    refused("format", "photo.jpg", image_bytes("PNG"), UploadLimits(formats=("JPEG",)))


def test_exif_orientation_is_applied_and_metadata_stripped():
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "SecretCam"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 24.0)
    data = image_bytes("JPEG", size=(100, 64), exif=exif)
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the input has GPS

    image = validate_image("rotated.jpg", data, LIMITS)
    assert (image.width, image.height) == (64, 100)
    out = Image.open(io.BytesIO(image.png))
    assert out.size == (64, 100)
    assert not out.getexif() and "exif" not in out.info and not out.info.get("icc_profile")
    assert b"SecretCam" not in image.png and b"eXIf" not in image.png


def test_not_an_image_never_echoes_the_contents():
    error = refused("not_an_image", "notes.png", b"my secret password is hunter2\n" * 10)
    assert "hunter2" not in str(error)


def test_truncated_png_is_refused():
    noisy = Image.effect_noise((256, 256), 64).convert("RGB")  # incompressible, so half the file is half the rows
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    data = buffer.getvalue()
    refused("truncated", "half.png", data[:len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncation_check_refuses_to_run_when_pillow_would_pad(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        validate_image("a.png", image_bytes("PNG"), LIMITS)


def test_bomb_declaring_30000_squared_is_refused_without_decoding():
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 200 and struct.unpack(">II", bomb[16:24]) == (30000, 30000)
    filters = list(warnings.filters)
    start = time.perf_counter()
    refused("pixels", "bomb.png", bomb)
    assert time.perf_counter() - start < 0.5
    assert warnings.filters == filters  # the local "error" filter did not leak


def test_own_pixel_limit_holds_whatever_pillows_global_is(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's guard off
    start = time.perf_counter()
    error = refused("pixels", "bomb.png", png_declaring(30000, 30000))
    assert time.perf_counter() - start < 0.5 and "900000000" in str(error)
    refused("pixels", "big.png", image_bytes("PNG", size=(200, 100)), UploadLimits(max_pixels=19_999))
    assert validate_image("ok.png", image_bytes("PNG", size=(200, 100)), UploadLimits(max_pixels=20_000))


def test_pillows_bomb_warning_becomes_a_refusal_only_here(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a 120x100 image is over it: a warning, not an error
    refused("pixels", "warned.png", image_bytes("PNG", size=(120, 100)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(image_bytes("PNG", size=(120, 100))))
    assert [w.category for w in caught] == [Image.DecompressionBombWarning]  # still a warning elsewhere


def test_short_side_is_refused():
    refused("min_side", "tiny.png", image_bytes("PNG", size=(32, 32)))
    refused("min_side", "strip.png", image_bytes("PNG", size=(500, 63)))
    assert validate_image("edge.png", image_bytes("PNG", size=(64, 64)), LIMITS).width == 64


def test_file_bytes_per_file():
    data = image_bytes("PNG")
    refused("file_bytes", "big.png", data, UploadLimits(max_file_bytes=len(data) - 1))


def test_read_limited_stops_as_soon_as_the_limit_is_passed():
    stream = io.BytesIO(b"\0" * (8 * 1024 * 1024))
    with pytest.raises(UploadError) as info:
        read_limited(stream, 1000, "dir/huge.png")
    assert (info.value.rule, info.value.filename) == ("file_bytes", "huge.png")
    assert stream.tell() == 1001  # never buffered more than the limit
    assert read_limited(io.BytesIO(b"x" * 1000), 1000, "a") == b"x" * 1000
    assert read_limited(io.BytesIO(b""), 1000, "a") == b""


def test_too_many_files_is_refused_before_decoding():
    batch = UploadBatch(UploadLimits(max_files=2))
    batch.add("a.png", image_bytes("PNG"))
    batch.add("b.png", image_bytes("PNG"))
    with pytest.raises(UploadError) as info:
        batch.add("c.png", b"not even an image")
    assert (info.value.rule, info.value.filename) == ("count", "c.png")
    with pytest.raises(UploadError, match="count"):
        batch.add_stream("d.png", io.BytesIO(image_bytes("PNG")))
    assert [i.filename for i in batch.finish()] == ["a.png", "b.png"]


def test_total_bytes_across_files():
    data = image_bytes("PNG")
    limits = UploadLimits(max_total_bytes=2 * len(data) + 10)
    batch = UploadBatch(limits)
    batch.add("a.png", data)
    batch.add_stream("b.png", io.BytesIO(data))
    assert batch.total_bytes == 2 * len(data) and batch.remaining_bytes == 10
    with pytest.raises(UploadError) as info:
        batch.add("c.png", data)
    assert info.value.rule == "total_bytes"
    stream = io.BytesIO(data)
    with pytest.raises(UploadError) as info:
        batch.add_stream("c.png", stream)
    assert info.value.rule == "total_bytes" and stream.tell() == 11  # stopped at the remaining total
    assert len(batch.images) == 2


def test_add_stream_names_the_per_file_limit():
    data = image_bytes("PNG")
    with pytest.raises(UploadError) as info:
        UploadBatch(UploadLimits(max_file_bytes=len(data) - 1)).add_stream("a.png", io.BytesIO(data))
    assert info.value.rule == "file_bytes"


def test_empty_upload_is_refused_at_finish():
    with pytest.raises(UploadError) as info:
        UploadBatch().finish()
    assert info.value.rule == "count" and info.value.filename is None and "at least 1" in str(info.value)
    with pytest.raises(UploadError, match="at least 2"):
        batch = UploadBatch(UploadLimits(min_files=2))
        batch.add("a.png", image_bytes("PNG"))
        batch.finish()


def test_a_bad_file_is_not_kept():
    batch = UploadBatch()
    with pytest.raises(UploadError):
        batch.add("a.txt", b"hello")
    assert batch.images == [] and batch.total_bytes == 0


@pytest.mark.parametrize("raw, clean", [
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\cat.jpg", "cat.jpg"),
    ("ca\x00t\n\x1b[31m.png", "cat[31m.png"),
    ("dir/..", "unnamed"),
    ("", "unnamed"),
    (None, "unnamed"),
    ("é" * 300 + ".png", "é" * 100),
])
def test_filenames_are_sanitised(raw, clean):
    assert safe_filename(raw) == clean
    if raw is not None:  # None is the upload as a whole
        assert UploadError(raw, "format", "x").filename == clean


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_files"):
        UploadLimits(max_files=0)
    with pytest.raises(ValueError, match="min_side"):
        UploadLimits(min_side=True)
    with pytest.raises(ValueError, match="min_files"):
        UploadLimits(min_files=3, max_files=2)
    with pytest.raises(ValueError, match="formats"):
        UploadLimits(formats=("PNG", "NOPE"))
    with pytest.raises(ValueError, match="formats"):
        UploadLimits(formats="PNG")
    assert UploadLimits(formats=["png", "jpeg"]).formats == ("PNG", "JPEG")
    with pytest.raises(ValueError, match="rule"):
        UploadError("a", "nope", "x")
    assert set(RULES) == {"count", "file_bytes", "total_bytes", "not_an_image", "truncated", "format", "pixels",
                          "min_side"}
