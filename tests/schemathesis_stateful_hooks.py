"""Schemathesis hooks for the stateful run of test_openapi.py: the generate rules of
schemathesis_hooks.py, plus real images in every multipart create, so that creates succeed and the
OpenAPI links (create -> get / cancel / delete, job -> its results) are walked. Random bytes never
decode as an image; the refusals of bad images are tested in test_subject_service.py."""

import io

import schemathesis
from PIL import Image

from schemathesis_hooks import filter_body  # noqa: F401 - registered by the import


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (seed % 256, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.operation.method.upper() == "POST" and case.operation.path == "/v1/subjects" \
            and isinstance(case.body, dict) and "images" in case.body:
        case.body["images"] = [_png(len(str(case.body)))]
