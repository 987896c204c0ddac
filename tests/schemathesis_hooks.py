"""Schemathesis hooks for test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

One request rule cannot be written in JSON Schema: ``guidance_steps`` (K) <= ``num_inference_steps``
(T) when both are given, since a schema cannot compare two fields (the rule with T left out, K <=
the default T, is in the schema). Bodies that break it are not generated; the server's 422 for
them is tested in test_serving.py. Nothing else is filtered.
"""

import schemathesis


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@schemathesis.hook
def filter_body(ctx, body):
    if isinstance(body, dict):
        k, t = body.get("guidance_steps"), body.get("num_inference_steps")
        if _number(k) and _number(t) and k > t:
            return False
    return True
