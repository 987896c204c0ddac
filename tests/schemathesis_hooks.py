"""Schemathesis hooks for test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

Some request rules cannot be written in JSON Schema, since a schema cannot compare two fields:
``guidance_steps`` (K) and ``maps_stop`` <= ``num_inference_steps`` (T) when both are given, and
``maps_start`` < ``maps_stop`` (or < T when maps_stop is left out). The rules with T left out (K,
maps_stop <= the default T) are in the schema. Bodies that break them are not generated; the
server's 422 for them is tested in test_serving.py and test_serving_attention.py. Likewise a
create's ``image_uris`` and any ``webhook_url``: whether a URI exists under an allowed prefix, or a
host resolves to a public address, is the server's storage and DNS, not a schema's to say (their
422s are tested in test_subject_service.py). Nothing else is filtered.
"""

import schemathesis


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@schemathesis.hook
def filter_body(ctx, body):
    if isinstance(body, dict):
        if body.get("image_uris") is not None or body.get("webhook_url") is not None:
            return False
        k, t = body.get("guidance_steps"), body.get("num_inference_steps")
        if _number(k) and _number(t) and k > t:
            return False
        start, stop = body.get("maps_start"), body.get("maps_stop")
        if _number(stop) and _number(t) and stop > t:
            return False
        stop = stop if _number(stop) else t if _number(t) else None
        if _number(start) and stop is not None and start >= stop:
            return False
    return True
