"""Tenants and keys (issue 29): the keys file, constant-time authentication, rotation without a
restart, weak keys, two credentials in one request, the 401 throttle, ``dreamblend keys``."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

import pytest

from dreamblend_ray.serving import tenants
from dreamblend_ray.serving.tenants import (FailureThrottle, KeyStore, Principal, Quotas, Tenant, check_key_strength,
                                            key_entry, new_key, parse_keys, presented_credentials,
                                            single_key_table)

REPO = Path(__file__).resolve().parents[1]
KEY_A1, KEY_A2, KEY_B = (f"dbk_{name}-0123456789abcdefghijklmnopqrstuv" for name in ("acme1", "acme2", "bolt"))


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_yaml(*entries: tuple[str, str, str], extra: str = "") -> str:
    """A keys file of (tenant, key id, key) entries, tenants in order of first appearance."""
    lines, by_tenant = ["tenants:"], {}
    for tenant, key_id, key in entries:
        by_tenant.setdefault(tenant, []).append((key_id, key))
    for tenant, keys in by_tenant.items():
        lines += [f"  {tenant}:", "    keys:"]
        lines += [f"      - {{id: {key_id}, sha256: '{sha(key)}'}}" for key_id, key in keys]
    return "\n".join(lines) + "\n" + extra


GOOD = """
tenants:
  acme:
    keys:
      - id: acme-2026-12
        sha256: "{a}"
    quotas:
      requests_per_minute: 600
      images_per_minute: 200
      concurrent_trainings: 2
      subjects: 100
    priority: 5
  bolt:
    keys:
      - id: bolt.k1
        sha256: "{b}"
""".format(a=sha(KEY_A1), b=sha(KEY_B))


# --------------------------------------------------------------------------------------------
# parsing


def test_parse_good_yaml_and_json():
    table = parse_keys(GOOD)
    assert list(table.tenants) == ["acme", "bolt"]
    acme = table.tenant("acme")
    assert acme == Tenant("acme", Quotas(600, 200, 2, 100), 5)
    assert table.tenant("bolt") == Tenant("bolt", Quotas(), 0)
    assert table.key_ids == ("acme-2026-12", "bolt.k1")
    assert table.key_ids_of("bolt") == ("bolt.k1",)
    with pytest.raises(KeyError):
        table.tenant("nobody")
    as_json = json.dumps({"tenants": {"acme": {"keys": [{"id": "k", "sha256": sha(KEY_A1).upper()}]}}})
    assert parse_keys(as_json).authenticate(KEY_A1) == Principal("acme", "k")


BAD = {
    "yaml syntax": ("tenants: [unclosed\n", "not valid YAML"),
    "json syntax": ('{"tenants": ', "not valid JSON"),
    "not a mapping": ("- 1\n- 2\n", "must be a mapping"),
    "empty": ("", "must be a mapping"),
    "unknown top field": (GOOD + "extra: 1\n", "unknown fields 'extra'"),
    "unknown tenant field": (keys_yaml(("acme", "k", KEY_A1), extra="    colour: red\n"), "unknown fields 'colour'"),
    "unknown key field": ("tenants:\n  acme:\n    keys:\n      - {id: k, sha256: '%s', key: x}\n" % sha(KEY_A1),
                          "unknown fields 'key'"),
    "unknown quota": (keys_yaml(("acme", "k", KEY_A1), extra="    quotas: {gpus: 1}\n"), "unknown fields 'gpus'"),
    "zero quota": (keys_yaml(("acme", "k", KEY_A1), extra="    quotas: {subjects: 0}\n"), "quota subjects"),
    "bool quota": (keys_yaml(("acme", "k", KEY_A1), extra="    quotas: {subjects: true}\n"), "quota subjects"),
    "bad priority": (keys_yaml(("acme", "k", KEY_A1), extra="    priority: high\n"), "priority"),
    "bad tenant id": (keys_yaml(("Acme", "k", KEY_A1)), "tenant id 'Acme' is not valid"),
    "numeric tenant id": (keys_yaml(("123", "k", KEY_A1)), "not a string"),
    "bad key id": (keys_yaml(("acme", "k/1", KEY_A1)), "the id must be a string"),
    "duplicate key ids": (keys_yaml(("acme", "k", KEY_A1), ("bolt", "k", KEY_B)), "'k' appears twice"),
    "duplicate hashes": (keys_yaml(("acme", "k1", KEY_A1), ("bolt", "k2", KEY_A1)), "same sha256"),
    "short hash": ("tenants:\n  acme:\n    keys:\n      - {id: k, sha256: 'abc123'}\n", "64 hexadecimal"),
    "non-hex hash": ("tenants:\n  acme:\n    keys:\n      - {id: k, sha256: '%s'}\n" % ("g" * 64), "64 hexadecimal"),
    "missing hash": ("tenants:\n  acme:\n    keys:\n      - {id: k}\n", "'sha256' is missing"),
    "no keys": ("tenants:\n  acme:\n    keys: []\n", "has no keys"),
    "keys absent": ("tenants:\n  acme: {priority: 1}\n", "has no keys"),
    "no tenants": ("tenants: {}\n", "defines no tenants"),
    "repeated tenant": (keys_yaml(("acme", "k1", KEY_A1)) + "  acme:\n    keys: [{id: k2, sha256: '%s'}]\n"
                        % sha(KEY_B), "repeats the field or tenant 'acme'"),
    "repeated json name": ('{"tenants": {"a": {"keys": []}, "a": {"keys": []}}}', "repeats the name 'a'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_parse_refuses_bad_files_without_echoing_digests(case):
    text, expected = BAD[case]
    with pytest.raises(ValueError) as exc:
        parse_keys(text)
    message = str(exc.value)
    assert expected in message
    for key in (KEY_A1, KEY_B):
        assert sha(key) not in message.lower() and key not in message


def test_a_key_pasted_where_an_id_goes_is_not_echoed():
    for text in (f"tenants:\n  {KEY_A1}:\n    keys: []\n",
                 f"tenants:\n  acme:\n    keys: *{KEY_A1}\n",
                 f"tenants:\n  acme:\n    keys:\n      - {{id: k, sha256: '{sha(KEY_A1)}', {KEY_A1}: 1}}\n",
                 "tenants:\n  acme:\n    keys:\n      - {id: %s, sha256: '%s'}\n" % (KEY_A1 + "/x", sha(KEY_A1)),
                 "tenants:\n  acme:\n    keys:\n      - {id: k, sha256: '%s'}\n   bad: [\n" % sha(KEY_A1)):
        with pytest.raises(ValueError) as exc:
            parse_keys(text)
        assert KEY_A1 not in str(exc.value), str(exc.value)
        assert sha(KEY_A1) not in str(exc.value)


def test_dataclasses_validate():
    with pytest.raises(ValueError, match="quota images_per_minute"):
        Quotas(images_per_minute=0)
    with pytest.raises(ValueError, match="tenant id"):
        Tenant("Not_Valid")
    with pytest.raises(ValueError, match="priority"):
        Tenant("acme", priority=1.5)
    with pytest.raises(ValueError, match="key id"):
        Principal("acme", "")
    with pytest.raises(AttributeError):
        Tenant("acme").priority = 3  # frozen


# --------------------------------------------------------------------------------------------
# authentication


def test_authenticate_two_tenants():
    table = parse_keys(GOOD)
    assert table.authenticate(KEY_A1) == Principal("acme", "acme-2026-12")
    assert table.authenticate(KEY_B) == Principal("bolt", "bolt.k1")
    for wrong in (KEY_A2, KEY_A1 + " ", KEY_A1[:-1], "", None, sha(KEY_A1), "\ud800"):
        assert table.authenticate(wrong) is None
    assert repr(table) == "KeyTable(2 tenants, 2 keys)"


@pytest.mark.parametrize("presented", [KEY_A1, KEY_B, KEY_A2, "", None])
def test_authenticate_compares_every_digest_whatever_the_key(monkeypatch, presented):
    """The constant-time property, checked structurally: no early exit on a match or a miss."""
    table = parse_keys(keys_yaml(("acme", "a1", KEY_A1), ("acme", "a2", KEY_A2), ("bolt", "b", KEY_B)))
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", counting)
    table.authenticate(presented)
    assert calls == [(32, 32)] * 3


def test_single_key_table_is_the_default_tenant():
    table = single_key_table(KEY_A1)
    assert table.authenticate(KEY_A1) == Principal("default", "default")
    assert table.authenticate(KEY_B) is None
    assert table.tenant("default") == Tenant("default")
    with pytest.raises(ValueError):
        single_key_table("")


# --------------------------------------------------------------------------------------------
# rotation


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    """Replace the file as a Secret update does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_rotation_without_a_restart(tmp_path, caplog):
    path, clock, seen = tmp_path / "keys.yaml", FakeClock(), []
    write(path, keys_yaml(("acme", "k1", KEY_A1)))
    store = KeyStore(path, clock=clock, check_every_s=2.0, on_reload=lambda old, new: seen.append((old, new)))
    assert store.current().authenticate(KEY_A1) == Principal("acme", "k1")
    assert store.current().authenticate(KEY_A2) is None

    write(path, keys_yaml(("acme", "k1", KEY_A1), ("acme", "k2", KEY_A2)))
    assert store.current().authenticate(KEY_A2) is None  # not yet due
    clock.now += 2.0
    table = store.current()
    assert table.authenticate(KEY_A1) == Principal("acme", "k1")
    assert table.authenticate(KEY_A2) == Principal("acme", "k2")
    assert store.reloads == 1 and store.last_error is None
    assert seen[-1][0].key_ids == ("k1",) and seen[-1][1].key_ids == ("k1", "k2")

    write(path, keys_yaml(("acme", "k2", KEY_A2)))
    clock.now += 2.0
    assert store.current().authenticate(KEY_A1) is None
    assert store.current().authenticate(KEY_A2) == Principal("acme", "k2")

    with caplog.at_level(logging.DEBUG, logger="dreamblend_ray.serving.tenants"):
        write(path, "tenants:\n  acme:\n    keys:\n      - {id: k3, sha256: '%s'}\n  broken: [\n" % sha(KEY_B))
        clock.now += 2.0
        assert store.current().authenticate(KEY_A2) == Principal("acme", "k2")  # last good kept
        assert store.current().authenticate(KEY_B) is None
        assert "not valid YAML" in store.last_error and store.reloads == 2
        clock.now += 2.0
        store.current()  # the same bad file: one warning, not one per check
        write(path, keys_yaml(("acme", "k2", KEY_A2), ("bolt", "b", KEY_B)))
        clock.now += 2.0
        assert store.current().authenticate(KEY_B) == Principal("bolt", "b")
    assert store.reloads == 3 and store.last_error is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping the last good keys" in warnings[0].getMessage()
    assert any("reloaded" in r.getMessage() for r in caplog.records)
    assert_no_key_material(caplog.text)


def assert_no_key_material(text: str) -> None:
    for key in (KEY_A1, KEY_A2, KEY_B):
        assert key not in text and sha(key) not in text.lower()


def test_a_missing_file_keeps_the_last_good_keys_and_the_first_load_must_succeed(tmp_path, caplog):
    path, clock = tmp_path / "keys.json", FakeClock()
    with pytest.raises(ValueError, match="not readable"):
        KeyStore(path, clock=clock)
    path.write_text("tenants: {}\n")
    with pytest.raises(ValueError, match="defines no tenants"):
        KeyStore(path, clock=clock)
    path.write_text(json.dumps({"tenants": {"acme": {"keys": [{"id": "k", "sha256": sha(KEY_A1)}]}}}))
    store = KeyStore(path, clock=clock, check_every_s=0)
    path.unlink()
    with caplog.at_level(logging.WARNING):
        assert store.current().authenticate(KEY_A1) == Principal("acme", "k")
    assert "not readable" in store.last_error
    assert_no_key_material(caplog.text)


def test_a_failing_reload_callback_does_not_break_authentication(tmp_path, caplog):
    path, clock = tmp_path / "keys.yaml", FakeClock()
    write(path, keys_yaml(("acme", "k1", KEY_A1)))

    def broken(old, new):
        raise RuntimeError(f"audit down while loading {new!r}")

    store = KeyStore(path, clock=clock, check_every_s=0, on_reload=broken)
    write(path, keys_yaml(("acme", "k2", KEY_A2)))
    assert store.current().authenticate(KEY_A2) == Principal("acme", "k2")
    assert "callback failed" in caplog.text
    assert_no_key_material(caplog.text)


# --------------------------------------------------------------------------------------------
# keys: strength, fresh keys, entries


def example_secret() -> str:
    text = (REPO / "k8s/base/secret-api-key.example.yaml").read_text()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("api-key:")][0]


@pytest.mark.parametrize("weak", ["k9Zq", "x" * 31, "a" * 64, "abababababababababababababababababab",
                                  "REPLACE_ME", "REPLACE_ME_0123456789abcdefghijklmnopqrstuvwxyz",
                                  "changeme-0123456789abcdefghijklmnopqrstuvwxyz",
                                  "my-test-key-0123456789abcdefghijkl"])
def test_weak_keys_are_refused_without_echoing_them(weak):
    with pytest.raises(ValueError) as exc:
        check_key_strength(weak)
    assert weak not in str(exc.value)


def test_the_example_secret_is_refused():
    with pytest.raises(ValueError, match="placeholder"):
        check_key_strength(example_secret())


def test_new_keys_are_strong_distinct_and_recognisable():
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        check_key_strength(key)
        assert key.startswith("dbk_") and len(key) >= 43


def test_key_entry_round_trip():
    key = new_key()
    entry = key_entry("acme", "acme-2026-12", key)
    assert key not in entry and sha(key) in entry
    assert parse_keys(entry).authenticate(key) == Principal("acme", "acme-2026-12")
    for odd_tenant, odd_id in (("no", "2026"), ("123", "null")):  # ids YAML would read as bool/int/null
        assert parse_keys(key_entry(odd_tenant, odd_id, key)).authenticate(key) == Principal(odd_tenant, odd_id)
    with pytest.raises(ValueError):
        key_entry("acme", "k", "changeme")
    with pytest.raises(ValueError):
        key_entry("Acme", "k", key)


# --------------------------------------------------------------------------------------------
# credentials of a request


@pytest.mark.parametrize("headers, expected", [
    ({}, (None, False)),
    ({"Authorization": f"Bearer {KEY_A1}"}, (KEY_A1, False)),
    ({"authorization": f"bearer   {KEY_A1} "}, (KEY_A1, False)),
    ({"X-API-Key": KEY_A1}, (KEY_A1, False)),
    ({"x-api-key": KEY_A1, "AUTHORIZATION": f"Bearer {KEY_A1}"}, (KEY_A1, False)),  # the same key twice
    ({"X-Api-Key": KEY_A1, "Authorization": f"Bearer {KEY_B}"}, (None, True)),
    ({"X-API-Key": KEY_A1, "Authorization": "junk"}, (None, True)),  # ST401
    ({"X-API-Key": KEY_A1, "Authorization": "Basic dXNlcjpwYXNz"}, (None, True)),
    ({"X-API-Key": KEY_A1, "Authorization": "Bearer"}, (None, True)),
    ({"X-API-Key": KEY_A1, "Authorization": ""}, (KEY_A1, False)),  # an empty header is no credential
    ({"Authorization": "Basic dXNlcjpwYXNz"}, (None, False)),
    ({"X-API-Key": ""}, (None, False)),
])
def test_presented_credentials(headers, expected):
    assert presented_credentials(headers) == expected


def test_presented_credentials_repeated_headers():
    """Starlette's Headers yield a repeated header once per value."""
    assert presented_credentials([("x-api-key", KEY_A1), ("x-api-key", KEY_B)]) == (None, True)
    assert presented_credentials([("authorization", f"Bearer {KEY_A1}"),
                                  ("Authorization", f"Bearer {KEY_B}")]) == (None, True)
    assert presented_credentials([("x-api-key", KEY_A1), ("x-api-key", KEY_A1)]) == (KEY_A1, False)


def test_presented_credentials_with_starlette_headers():
    from starlette.datastructures import Headers

    raw = [(b"x-api-key", KEY_A1.encode()), (b"authorization", b"junk")]
    assert presented_credentials(Headers(raw=raw)) == (None, True)
    assert presented_credentials(Headers(raw=raw[:1])) == (KEY_A1, False)


# --------------------------------------------------------------------------------------------
# the 401 throttle


def test_throttle_blocks_after_the_limit_and_forgets_after_the_window():
    clock = FakeClock()
    throttle = FailureThrottle(limit=3, window_s=60, clock=clock)
    assert throttle.blocked("10.0.0.1") == 0.0
    for _ in range(2):
        throttle.record_failure("10.0.0.1")
        clock.now += 10
    assert throttle.blocked("10.0.0.1") == 0.0
    throttle.record_failure("10.0.0.1")  # failures at 1000, 1010, 1020
    assert throttle.blocked("10.0.0.1") == pytest.approx(40.0)
    assert throttle.blocked("10.0.0.2") == 0.0
    clock.now += 40  # the first failure leaves the window
    assert throttle.blocked("10.0.0.1") == 0.0
    throttle.record_failure("10.0.0.1")
    assert throttle.blocked("10.0.0.1") == pytest.approx(10.0)
    clock.now += 61
    assert throttle.blocked("10.0.0.1") == 0.0


def test_throttle_memory_is_bounded():
    clock = FakeClock()
    throttle = FailureThrottle(limit=2, window_s=60, clock=clock, max_addresses=100)
    for index in range(1000):
        throttle.record_failure(f"10.0.{index // 256}.{index % 256}")
    assert len(throttle) == 100
    for _ in range(50):
        throttle.record_failure("192.0.2.7")
    assert len(throttle._failures["192.0.2.7"]) == 2
    assert throttle.blocked("192.0.2.7") > 0
    assert throttle.blocked("10.0.0.0") == 0.0  # evicted: the oldest go first
    throttle.record_failure(None)
    assert throttle.blocked(None) == 0.0
    with pytest.raises(ValueError):
        FailureThrottle(limit=0)
    with pytest.raises(ValueError):
        FailureThrottle(window_s=0)


# --------------------------------------------------------------------------------------------
# dreamblend keys


def test_keys_new_prints_the_entry_then_the_key(capsys, caplog):
    from dreamblend_ray.cli import main

    assert main(["keys", "new", "--tenant", "acme", "--key-id", "acme-2026-12"]) == 0
    out = capsys.readouterr().out
    *entry_lines, key = out.rstrip("\n").split("\n")
    table = parse_keys("\n".join(entry_lines) + "\n")
    assert table.authenticate(key) == Principal("acme", "acme-2026-12")
    check_key_strength(key)
    assert key not in "\n".join(entry_lines)
    assert key not in caplog.text


def test_keys_new_default_key_id_and_check(capsys, tmp_path):
    from dreamblend_ray.cli import main

    assert main(["keys", "new", "--tenant", "bolt"]) == 0
    out = capsys.readouterr().out
    *entry_lines, key = out.rstrip("\n").split("\n")
    path = tmp_path / "keys.yaml"
    path.write_text("\n".join(entry_lines) + "\n")
    principal = parse_keys(path.read_text()).authenticate(key)
    assert principal.tenant == "bolt" and principal.key_id.startswith("bolt-")
    assert main(["keys", "check", str(path)]) == 0
    listed = capsys.readouterr().out
    assert principal.key_id in listed and sha(key) not in listed
    assert main(["keys", "new", "--tenant", "Not Valid"]) == 2
    path.write_text("tenants: {}\n")
    assert main(["keys", "check", str(path)]) == 2
