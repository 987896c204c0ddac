"""Schemathesis hooks for the stateful run of test_openapi.py: the generate rules of
schemathesis_hooks.py, plus real images in every multipart create, so that creates succeed and the
OpenAPI links (create -> get / cancel / delete, job -> its results) are walked. Random bytes never
decode as an image; the refusals of bad images are tested in test_subject_service.py."""

import io
import os

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


OTHER_TENANT_KEY = os.environ.get("DREAMBLEND_OTHER_TENANT_KEY")
OBJECT_PARAMETERS = {"subject_id", "job_id"}


@schemathesis.check
def another_tenant_gets_404(ctx, response, case):
    """After any 2xx on an object of the run's tenant, the same call with another tenant's key is a
    404 (existence is not revealed; a DELETE replayed by the other tenant must not delete it)."""
    if not OTHER_TENANT_KEY or not 200 <= response.status_code < 300:
        return None
    if not OBJECT_PARAMETERS & set(case.path_parameters or {}):
        return None
    other = case.call(headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"})
    with open("cross_tenant_checks.log", "a", encoding="utf-8") as log:  # the test counts these (cwd)
        log.write(f"{case.method} {case.path} {other.status_code}\n")
    if other.status_code != 404:
        raise AssertionError(f"another tenant's key got {other.status_code} on {case.method} {case.formatted_path}, "
                             "not 404")
    return None
