"""The OpenAPI schema says what the API does: Schemathesis, all checks, over real HTTP.

The app (``http_api.make_api``, auth on, the fake backend and store of api_fakes.py) is served by
uvicorn on a loopback port; the Schemathesis CLI reads its /openapi.json and runs the examples,
coverage and fuzzing phases with ``--checks all`` (server errors, undocumented statuses and
content types, response bodies and headers against their schemas, schema-valid data accepted,
schema-invalid data rejected, auth not ignored, ...). Bounded: a few dozen cases per operation.
Set DREAMBLEND_SCHEMATHESIS_EXAMPLES / DREAMBLEND_SCHEMATHESIS_SEED for a longer or another run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from api_fakes import make_app, serve_on_loopback

KEY = "openapi-k3y-5b7c9d1e3f5a7b9c1d3e5f7a9b1c"
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def base_url(monkeypatch_module):
    monkeypatch_module.setenv("DB_OPENAPI_KEY", KEY)
    # Schemathesis sends many requests without a valid key on purpose (its auth checks): a throttle
    # that 429s them after ten would hide the routes from it. The throttle has its own tests.
    with serve_on_loopback(make_app(auth_enabled=True, api_key_env="DB_OPENAPI_KEY",
                                    auth_failures_per_minute=100_000)) as url:
        yield url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def schema_of(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/openapi.json", timeout=10).json()


def test_every_status_is_declared_with_its_error_model(base_url):
    paths = schema_of(base_url)["paths"]
    generate = paths["/v1/generate"]["post"]["responses"]
    assert set(generate) == {"200", "400", "401", "404", "409", "413", "422", "424", "429", "500", "503", "504"}
    assert set(paths["/v1/subjects/{subject_id}"]["get"]["responses"]) == {"200", "401", "404", "422", "424",
                                                                          "429", "500", "503"}
    assert set(paths["/healthz"]["get"]["responses"]) == {"200", "401", "422", "429", "500", "503"}
    for operations in paths.values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith("2"):
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ValidationErrorBody" if status == "422" else "/ErrorBody"), (status, ref)
    assert "Retry-After" in generate["503"]["headers"]
    assert set(generate["200"]["content"]) == {"image/png", "application/json"}


def test_limits_rules_and_examples_are_in_the_schema(base_url):
    schema = schema_of(base_url)
    body = schema["components"]["schemas"]["GenerateRequest"]
    props = body["properties"]
    assert props["subject_id"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    assert props["prompts"]["anyOf"][0]["maxItems"] == 4 and props["prompts"]["anyOf"][0]["items"]["maxLength"] == 2000
    assert props["num_images"]["maximum"] == 4
    assert props["num_inference_steps"]["anyOf"][0]["maximum"] == 100
    assert props["alpha"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 10.0}
    assert body["additionalProperties"] is False and body["examples"]
    one_of = body["allOf"][0]["oneOf"]  # exactly one of prompt / prompts
    assert [branch["required"] for branch in one_of] == [["prompt"], ["prompts"]]
    path = schema["paths"]["/v1/subjects/{subject_id}"]["get"]["parameters"][0]["schema"]
    assert path["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    assert schema["components"]["securitySchemes"].keys() == {"bearer", "apiKey"}


def test_the_cross_field_rules_in_the_schema_match_the_server(base_url):
    """jsonschema and the server agree on the rules the schema states (image count, png, K without T)."""
    import httpx
    import jsonschema

    body_schema = schema_of(base_url)["components"]["schemas"]["GenerateRequest"]
    validator = jsonschema.Draft202012Validator(body_schema)
    cases = [{"prompts": ["a", "b"], "num_images": 2}, {"prompts": ["a", "b"], "num_images": 3},
             {"prompts": ["a", "b", "c"], "num_images": 2}, {"prompt": "a", "num_images": 2, "response_format": "png"},
             {"prompt": "a", "guidance_steps": 30}, {"prompt": "a", "guidance_steps": 31},
             {"prompt": "a", "prompts": ["b"]}, {"prompt": None, "prompts": ["b"]}, {}]
    headers = {"Authorization": f"Bearer {KEY}"}
    for case in cases:
        body = {"subject_id": "dog", "seed": 1, "response_format": "json", **case}
        valid = validator.is_valid(body)
        status = httpx.post(f"{base_url}/v1/generate", json=body, headers=headers, timeout=10).status_code
        assert status == (200 if valid else 422), (body, valid, status)


@pytest.mark.slow
def test_schemathesis_all_checks_find_nothing(base_url, tmp_path):
    examples = os.environ.get("DREAMBLEND_SCHEMATHESIS_EXAMPLES", "30")
    seed = os.environ.get("DREAMBLEND_SCHEMATHESIS_SEED", "20261202")
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(TESTS / "schemathesis.toml"), "run",
               f"{base_url}/openapi.json",
               "--checks", "all", "--phases", "examples,coverage,fuzzing", "--max-examples", examples,
               "--seed", seed, "--generation-database", "none", "--workers", "1", "--request-timeout", "60",
               "--max-response-time", "30",  # the fake answers in ms; only a loaded 2-core CI machine is slow
               "--header", f"Authorization: Bearer {KEY}", "--no-color",
               "--report", "junit", "--report-dir", str(tmp_path)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[output.find("FAILURES"):][:6000]
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) >= 100, output[-3000:]  # it really ran
    for phase in ("Examples", "Coverage", "Fuzzing"):
        assert f"✅ {phase}" in output, output[-3000:]
    assert "failure" not in output.split("SUMMARY")[-1].lower(), output[-3000:]


@pytest.fixture(scope="module")
def tenants_url(tmp_path_factory):
    """The app with a keys file of two tenants: Schemathesis runs with alpha's key, and a check of
    ours replays every successful call on alpha's objects with beta's key."""
    import yaml

    from dreamblend_ray.serving.tenants import key_entry

    keys = {"alpha": "alpha-k3y-0f1e2d3c4b5a69788796a5b4c3d2e1f0", "beta": "beta-k3y-a1b2c3d4e5f60718293a4b5c6d7e8f90"}
    entries = [yaml.safe_load(key_entry(t, f"{t}-1", k))["tenants"] for t, k in keys.items()]
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"tenants": {**entries[0], **entries[1]}}))
    app = make_app(auth_enabled=True, keys_file=str(path), auth_failures_per_minute=100_000)
    with serve_on_loopback(app) as url:
        yield url, keys


@pytest.mark.slow
def test_schemathesis_stateful_walks_the_subject_lifecycle(tenants_url, tmp_path):
    """The OpenAPI links (create -> get / cancel / delete) walked with real images, with a tenant's
    key: no server error, no schema violation, the links really followed, and another tenant's key
    on every object the walk created is a 404 (schemathesis_stateful_hooks.another_tenant_gets_404)."""
    base_url, keys = tenants_url
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(TESTS / "schemathesis.toml"), "run",
               f"{base_url}/openapi.json", "--checks", "all", "--phases", "stateful", "--max-examples", "20",
               "--seed", "20261207", "--generation-database", "none", "--workers", "1", "--request-timeout", "60",
               "--max-response-time", "30", "--header", f"Authorization: Bearer {keys['alpha']}", "--no-color",
               "--include-path-regex", "^/v1/subjects", "--mode", "positive",
               # positive data only (the hook puts real images in): refusals are the fuzzing test's
               "--exclude-checks", "negative_data_rejection"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_stateful_hooks",
           "DREAMBLEND_OTHER_TENANT_KEY": keys["beta"],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[output.find("FAILURES"):][:6000]
    assert "✅ Stateful" in output, output[-3000:]
    replays = (tmp_path / "cross_tenant_checks.log").read_text().splitlines()
    assert {line.split()[0] for line in replays} >= {"GET", "POST", "DELETE"}, replays  # our check really ran
    assert all(line.endswith(" 404") for line in replays), replays
    links = re.search(r"Links:\s+(\d+) covered / (\d+) selected", output)
    assert links and int(links.group(1)) >= 3, output[-3000:]  # get, cancel and delete after a create


def test_the_error_table_in_the_docs_lists_every_status():
    from dreamblend_ray.serving.http import ERRORS

    docs = (TESTS.parent / "docs" / "serving.md").read_text()
    table = docs[docs.index("## Errors"):docs.index("### Health")]
    rows = set(re.findall(r"^\| (\d{3}) \|", table, flags=re.M))
    assert rows == {str(status) for status in ERRORS}
