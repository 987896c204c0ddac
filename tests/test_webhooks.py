"""Webhooks: Standard Webhooks signatures, backoff, and the durable outbox against a real receiver.

The receiver is an http.server thread on 127.0.0.1 that checks every delivery with ``verify``; the
outbox's clock is fake, so retries are due without sleeping.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import socket
import threading

import pytest

from dreamblend_ray.io import storage
from dreamblend_ray.io.netguard import NetPolicy
from dreamblend_ray.lifecycle.webhooks import (EVENTS, Outbox, WebhookPolicy, backoff_s, decode_secret,
                                               load_secret, sign, verify)

# The example of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID, SPEC_TIMESTAMP = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="  # (lower-case "tmIK")
LOCAL = NetPolicy(allow_loopback=True, require_https=False)


def spec_headers(**changes) -> dict:
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TIMESTAMP), "webhook-signature": SPEC_SIGNATURE}
    return {**headers, **changes}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


# ------------------------------------------------------------------------------------ signatures --

def test_sign_reproduces_the_spec_example():
    assert sign(decode_secret(SPEC_SECRET), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + 10)
    verify(decode_secret(SPEC_SECRET), {k.title(): v for k, v in spec_headers().items()}, SPEC_BODY,
           now=SPEC_TIMESTAMP)


def test_verify_accepts_any_of_several_signatures():
    several = f"v1,bm90IGl0 v2,{SPEC_SIGNATURE[3:]} {SPEC_SIGNATURE}"
    verify(SPEC_SECRET, spec_headers(**{"webhook-signature": several}), SPEC_BODY, now=SPEC_TIMESTAMP)
    with pytest.raises(ValueError, match="no signature matches"):
        verify(SPEC_SECRET, spec_headers(**{"webhook-signature": f"v2,{SPEC_SIGNATURE[3:]}"}), SPEC_BODY,
               now=SPEC_TIMESTAMP)


@pytest.mark.parametrize("headers, body, secret", [
    (spec_headers(), b'{"test": 2432232315}', SPEC_SECRET),
    (spec_headers(**{"webhook-id": "msg_other"}), SPEC_BODY, SPEC_SECRET),
    (spec_headers(**{"webhook-timestamp": str(SPEC_TIMESTAMP + 1)}), SPEC_BODY, SPEC_SECRET),
    (spec_headers(), SPEC_BODY, new_secret()),
])
def test_verify_rejects_tampering(headers, body, secret):
    with pytest.raises(ValueError, match="no signature matches"):
        verify(secret, headers, body, now=SPEC_TIMESTAMP)


def test_verify_rejects_stale_future_and_incomplete_deliveries():
    with pytest.raises(ValueError, match="old"):
        verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + 301)
    with pytest.raises(ValueError, match="in the future"):
        verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP - 301)
    with pytest.raises(ValueError, match="required"):
        verify(SPEC_SECRET, {"webhook-id": SPEC_ID}, SPEC_BODY, now=SPEC_TIMESTAMP)
    with pytest.raises(ValueError, match="not an integer"):
        verify(SPEC_SECRET, spec_headers(**{"webhook-timestamp": "soon"}), SPEC_BODY, now=SPEC_TIMESTAMP)


def test_load_secret_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DREAMBLEND_WEBHOOK_SECRET", raising=False)
    assert load_secret() is None
    monkeypatch.setenv("DREAMBLEND_WEBHOOK_SECRET", f"  {SPEC_SECRET}\n")
    assert load_secret() == decode_secret(SPEC_SECRET) and len(load_secret()) == 24
    other = new_secret()
    (tmp_path / "secret").write_text(other + "\n")
    assert load_secret(file=str(tmp_path / "secret")) == base64.b64decode(other[6:])  # the file wins
    monkeypatch.setenv("MY_SECRET", other)
    assert load_secret("MY_SECRET") == base64.b64decode(other[6:])


@pytest.mark.parametrize("value, rule", [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
    ("whsec_not*base64!", "not valid base64"),
    ("whsec_" + base64.b64encode(b"short").decode(), "at least 24 bytes"),
])
def test_load_secret_refuses_bad_values_without_showing_them(monkeypatch, tmp_path, value, rule):
    monkeypatch.setenv("DREAMBLEND_WEBHOOK_SECRET", value)
    with pytest.raises(ValueError, match=rule) as info:
        load_secret()
    assert value[6:] not in str(info.value)
    (tmp_path / "secret").write_text(value)
    with pytest.raises(ValueError, match=rule):
        load_secret(file=str(tmp_path / "secret"))
    with pytest.raises(ValueError, match="could not be read"):
        load_secret(file=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- policy and backoff --

def test_policy_validates_its_fields():
    for bad in ({"max_attempts": 0}, {"max_attempts": True}, {"base_delay_s": 0}, {"timeout_s": -1},
                {"base_delay_s": 10, "max_delay_s": 5}, {"net": "loopback"}):
        with pytest.raises(ValueError):
            WebhookPolicy(**bad)
    assert WebhookPolicy().max_attempts == 8 and WebhookPolicy().net == NetPolicy()


def test_backoff_grows_exponentially_and_is_capped():
    policy = WebhookPolicy(base_delay_s=1.0, max_delay_s=60.0)
    delays = [backoff_s(n, policy) for n in range(1, 12)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0] and max(delays) == 60.0
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert backoff_s(10_000, policy) == 60.0
    jittered = [backoff_s(n, policy, "msg_abc") for n in range(1, 12)]
    assert jittered == [backoff_s(n, policy, "msg_abc") for n in range(1, 12)]  # pure
    assert all(a <= b for a, b in zip(jittered, jittered[1:]))
    assert all(0.9 * d <= j <= d for d, j in zip(delays, jittered))
    with pytest.raises(ValueError, match="attempt"):
        backoff_s(0, policy)


# --------------------------------------------------------------------------- a real receiver --

class FakeClock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Receiver:
    """An http.server on 127.0.0.1 that verifies every delivery; answers ``statuses`` in turn
    (then 204). ``received`` holds (headers, body) of the verified deliveries."""

    def __init__(self, secret: str, clock: FakeClock, statuses=()):
        self.secret, self.clock, self.statuses = secret, clock, list(statuses)
        self.received, self.rejected, self.httpd = [], 0, None

    def start(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    verify(receiver.secret, self.headers, body, now=receiver.clock())
                except ValueError:
                    receiver.rejected += 1
                    status = 401
                else:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks?token=receiver-token"

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture()
def clock():
    return FakeClock()


@pytest.fixture()
def secret():
    return new_secret()


@pytest.fixture()
def receivers():
    started = []
    yield started
    for receiver in started:
        receiver.stop()


def outbox_at(root: str, secret: str, clock: FakeClock, **policy) -> Outbox:
    policy = {"max_attempts": 4, "base_delay_s": 2.0, "max_delay_s": 30.0, "timeout_s": 2.0, "net": LOCAL,
              **policy}
    return Outbox(root, decode_secret(secret), WebhookPolicy(**policy), clock=clock)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def down_then_up(root: str, secret: str, clock: FakeClock, receivers: list) -> None:
    """A receiver that is down for two tries, then up: one verified delivery, then nothing."""
    port = closed_port()
    outbox = outbox_at(root, secret, clock)
    msg_id = outbox.enqueue("subject.ready", f"http://127.0.0.1:{port}/hooks?token=t0p", {"subject_id": "cat"},
                            request_id="req-1")
    waits = []
    for _ in range(2):
        assert outbox.deliver_due() == {"delivered": 0, "retried": 1, "dead": 0, "errors": 0}
        (record,) = outbox.pending()
        assert record["last_error"] == "ConnectionRefusedError"
        waits.append(record["next_attempt_at"] - clock.now)
        assert outbox.deliver_due(now=record["next_attempt_at"] - 0.01)["retried"] == 0  # not due yet
        clock.now = record["next_attempt_at"]
    assert waits[1] > waits[0] > 0 and record["attempts"] == 2
    receiver = Receiver(secret, clock).start(port)
    receivers.append(receiver)
    restarted = outbox_at(root, secret, clock)  # and a restart of the service in between
    assert restarted.deliver_due() == {"delivered": 1, "retried": 0, "dead": 0, "errors": 0}
    clock.now += 3600
    assert restarted.deliver_due() == {"delivered": 0, "retried": 0, "dead": 0, "errors": 0}
    assert len(receiver.received) == 1 and receiver.rejected == 0
    headers, body = receiver.received[0]
    assert headers["webhook-id"] == msg_id and headers["content-type"] == "application/json"
    assert json.loads(body) == {"type": "subject.ready", "timestamp": "2027-01-15T08:00:00Z",
                                "data": {"subject_id": "cat"}}
    assert restarted.pending() == [] and storage.list_files(storage.join(root, "webhooks")) == []


def test_a_receiver_down_then_up_gets_the_delivery_once(tmp_path, secret, clock, receivers):
    down_then_up(str(tmp_path / "root"), secret, clock, receivers)


def test_the_outbox_works_over_s3(s3_bucket, secret, clock, receivers):
    down_then_up(f"{s3_bucket}/service", secret, clock, receivers)


def test_retries_send_the_same_id_and_body_with_fresh_timestamps(tmp_path, secret, clock, receivers):
    receiver = Receiver(secret, clock, statuses=[503, 500]).start()
    receivers.append(receiver)
    outbox = outbox_at(str(tmp_path), secret, clock)
    msg_id = outbox.enqueue("job.completed", receiver.url, {"job_id": "j1", "images": 4})
    for _ in range(3):
        outbox.deliver_due()
        clock.now += 120
    assert [r[0]["webhook-id"] for r in receiver.received] == [msg_id] * 3
    assert len({r[1] for r in receiver.received}) == 1
    assert len({r[0]["webhook-timestamp"] for r in receiver.received}) == 3
    assert outbox.pending() == [] and receiver.rejected == 0


def test_a_receiver_failing_forever_ends_dead_after_max_attempts(tmp_path, secret, clock, receivers):
    receiver = Receiver(secret, clock, statuses=[500] * 100).start()
    receivers.append(receiver)
    outbox = outbox_at(str(tmp_path), secret, clock, max_attempts=3)
    msg_id = outbox.enqueue("subject.failed", receiver.url, {"subject_id": "cat", "error": "oom"})
    counts = []
    for _ in range(6):
        counts.append(outbox.deliver_due())
        clock.now += 3600
    assert [c["retried"] for c in counts] == [1, 1, 0, 0, 0, 0] and [c["dead"] for c in counts][2] == 1
    assert len(receiver.received) == 3 and outbox.pending() == []
    (dead,) = outbox.dead_letters()
    assert dead["id"] == msg_id and dead["attempts"] == 3 and dead["last_error"] == "HTTP 500"
    assert storage.exists(storage.join(str(tmp_path), "webhooks", "dead", f"{msg_id}.json"))


def test_records_are_durable_json_in_storage(tmp_path, secret, clock):
    outbox = outbox_at(str(tmp_path), secret, clock)
    msg_id = outbox.enqueue("subject.training", "http://127.0.0.1:9/x", {"subject_id": "cat"}, "req-7")
    record = storage.read_json(storage.join(str(tmp_path), "webhooks", "outbox", f"{msg_id}.json"))
    assert msg_id.startswith("msg_") and record["id"] == msg_id and record["attempts"] == 0
    assert record["payload"] == {"type": "subject.training", "timestamp": "2027-01-15T08:00:00Z",
                                 "data": {"subject_id": "cat"}}
    assert json.loads(record["body"]) == record["payload"] and record["request_id"] == "req-7"
    assert record["next_attempt_at"] == record["created_at"] == clock.now and record["last_error"] is None
    assert secret[6:] not in json.dumps(record)


def test_enqueue_refuses_bad_input_and_stores_nothing(tmp_path, secret, clock):
    outbox = outbox_at(str(tmp_path), secret, clock)
    with pytest.raises(ValueError, match="unknown webhook event"):
        outbox.enqueue("subject.exploded", "http://127.0.0.1:9/x", {})
    with pytest.raises(ValueError, match="private"):
        outbox.enqueue("subject.ready", "http://10.0.0.1/x", {})
    with pytest.raises(ValueError, match="link-local"):
        outbox.enqueue("subject.ready", "http://169.254.169.254/latest", {})
    with pytest.raises(ValueError, match="plain JSON"):
        outbox.enqueue("subject.ready", "http://127.0.0.1:9/x", {"score": float("nan")})
    without = Outbox(str(tmp_path), None, WebhookPolicy(net=LOCAL), clock=clock)
    with pytest.raises(ValueError, match="webhooks need a secret"):
        without.enqueue("subject.ready", "http://127.0.0.1:9/x", {})
    assert storage.list_files(str(tmp_path)) == [] and len(EVENTS) == 6


def test_delivery_never_raises_and_never_logs_the_query_or_the_secret(tmp_path, secret, clock, caplog):
    def failing_post(url, body, headers, policy, timeout_s, need_allow_list=False):
        raise RuntimeError(f"boom at {url}")

    outbox = Outbox(str(tmp_path), decode_secret(secret), WebhookPolicy(net=LOCAL), clock=clock, post=failing_post)
    outbox.enqueue("subject.deleted", "http://127.0.0.1:9/x?token=SECRET123", {"subject_id": "cat"})
    (tmp_path / "webhooks" / "outbox" / "garbage.json").write_text("{not json")
    with caplog.at_level(logging.DEBUG, logger="dreamblend_ray.lifecycle.webhooks"):
        assert outbox.deliver_due() == {"delivered": 0, "retried": 1, "dead": 0, "errors": 0}
    (record,) = outbox.pending()
    assert record["last_error"] == "RuntimeError"
    assert "SECRET123" not in caplog.text and secret[6:] not in caplog.text and "garbage.json" in caplog.text
    assert "SECRET123" not in record["last_error"] and secret[6:] not in repr(outbox)


def test_a_pass_honours_its_limit_most_overdue_first(tmp_path, secret, clock, receivers):
    receiver = Receiver(secret, clock).start()
    receivers.append(receiver)
    outbox = outbox_at(str(tmp_path), secret, clock)
    ids = []
    for n in range(3):
        ids.append(outbox.enqueue("subject.ready", receiver.url, {"n": n}))
        clock.now += 1
    assert outbox.deliver_due(limit=2)["delivered"] == 2
    assert [json.loads(body)["data"]["n"] for _, body in receiver.received] == [0, 1]
    assert [r["id"] for r in outbox.pending()] == [ids[2]]


def test_deliveries_to_one_url_arrive_in_the_order_they_were_queued(tmp_path, secret, clock, receivers):
    receiver = Receiver(secret, clock, statuses=[503]).start()  # the first try of the first event fails
    receivers.append(receiver)
    other = Receiver(secret, clock).start()
    receivers.append(other)
    outbox = outbox_at(str(tmp_path), secret, clock)
    for n, kind in enumerate(("subject.training", "subject.ready")):
        outbox.enqueue(kind, receiver.url, {"n": n})
        clock.now += 0.001
    outbox.enqueue("subject.ready", other.url, {"n": 9})
    counts = outbox.deliver_due()
    assert counts["retried"] == 1 and counts["delivered"] == 1  # the later event waits; another URL does not
    assert [json.loads(b)["data"]["n"] for _, b in other.received] == [9]
    clock.now += 60
    assert outbox.deliver_due()["delivered"] == 2
    kinds = [json.loads(body)["type"] for _, body in receiver.received]
    assert kinds == ["subject.training", "subject.training", "subject.ready"]  # failed try, retry, then the next


def test_an_allow_list_binds_webhook_urls(tmp_path, secret, clock):
    policy = {"net": NetPolicy(allow_hosts=("hooks.example.com",))}
    outbox = outbox_at(str(tmp_path), secret, clock, **policy)
    with pytest.raises(ValueError, match="allow"):
        outbox.enqueue("subject.ready", "https://elsewhere.example.org/hook", {"id": "x"})
