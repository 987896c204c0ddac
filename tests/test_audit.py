"""The audit trail: one object per event, read back in order and filtered; failures never raise."""

import json
import logging

import pytest

from dreamblend_ray.cli import main
from dreamblend_ray.io import storage
from dreamblend_ray.lifecycle.audit import ACTIONS, AuditLog, read_events

DAY = 86_400.0
T0 = 1_796_601_600.0  # 2026-12-07T00:00:00Z


class FakeClock:
    def __init__(self, now: float = T0 + 3600):
        self.now = now

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def fill(root: str, clock: FakeClock) -> AuditLog:
    log = AuditLog(root, clock=clock)
    log.record("subject.create", "acme", "k1", target="rex", request_id="r1", detail={"images": 4})
    log.record("quota.refused", "acme", "k1", request_id="r2", detail={"quota": "images_per_minute"})
    log.record("subject.create", "globex", "k9", target="rex", request_id="r3")
    clock.now += DAY  # the next UTC day
    log.record("subject.delete", "acme", "k2", target="rex", request_id="r4")
    log.record("keys.reload", "-", None, detail={"tenants": 2, "entries": 3})
    return log


def test_events_are_written_one_object_each_and_read_back_in_order(tmp_path):
    root = str(tmp_path / "store")
    log = fill(root, FakeClock())
    assert log.failures == 0
    files = storage.list_files(storage.join(root, "audit"))
    assert [f.split("/")[0] for f in files] == ["2026-12-07"] * 3 + ["2026-12-08"] * 2
    events = read_events(root)
    assert [e["request_id"] for e in events][:4] == ["r1", "r2", "r3", "r4"]
    first = events[0]
    assert first == {"time": "2026-12-07T01:00:00.001000Z", "action": "subject.create", "tenant": "acme",
                     "key_id": "k1", "target": "rex", "request_id": "r1", "detail": {"images": 4}}
    assert events[-1]["action"] == "keys.reload" and events[-1]["key_id"] is None
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)


def test_filters(tmp_path):
    root = str(tmp_path)
    fill(root, FakeClock())
    assert [e["request_id"] for e in read_events(root, tenant="acme")] == ["r1", "r2", "r4"]
    assert [e["request_id"] for e in read_events(root, action="subject.create")] == ["r1", "r3"]
    assert [e["request_id"] for e in read_events(root, since="2026-12-08", tenant="acme")] == ["r4"]
    assert [e["request_id"] for e in read_events(root, limit=2)] == ["r1", "r2"]
    assert read_events(root, since="2026-12-09") == []
    assert read_events(str(tmp_path / "empty")) == []


def test_bad_filters_are_refused(tmp_path):
    for kwargs, word in (({"since": "07/12/2026"}, "YYYY-MM-DD"), ({"since": "2026-13-01"}, "YYYY-MM-DD"),
                         ({"action": "subject.eat"}, "action"), ({"limit": 0}, "limit")):
        with pytest.raises(ValueError, match=word):
            read_events(str(tmp_path), **kwargs)


def test_stray_and_corrupt_files_are_skipped(tmp_path):
    root = str(tmp_path)
    fill(root, FakeClock())
    day = tmp_path / "audit" / "2026-12-07"
    (day / ".00000000000000000001-abcdef12.json.x.tmp").write_text("{")
    (day / "00000000000000000002-abcdef12.json").write_text("{ not json")
    (tmp_path / "audit" / "notes").mkdir()
    assert len(read_events(root)) == 5


def test_a_failing_storage_does_not_raise_and_counts_a_failure(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the root's folder should be")
    log = AuditLog(str(blocker / "root"), clock=FakeClock())
    with caplog.at_level(logging.ERROR, logger="dreamblend_ray.lifecycle.audit"):
        log.record("subject.delete", "acme", "k1", target="rex", detail={"images": 1})
        log.record("subject.cancel", "acme", "k1", target="rex")
    assert log.failures == 2
    assert "subject.delete" in caplog.text and "not written" in caplog.text


@pytest.mark.parametrize("detail", [
    {"api_key": "x"}, {"Authorization": "Bearer abc"}, {"client_secret": 1}, {"password": None},
    {"refresh_token": "t"}, {"note": "dbk_" + "A1b2C3d4" * 5}, {"ids": ["ok", "Z" * 32]},
    {"nested": {"a": 1}}, {"x" * 40: 1}, "not a dict",
])
def test_detail_with_key_material_is_refused(tmp_path, detail, caplog):
    log = AuditLog(str(tmp_path), clock=FakeClock())
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ValueError) as exc:
            log.record("auth.refused", "acme", "k1", detail=detail)
    assert "A1b2C3d4" not in str(exc.value) and "Z" * 32 not in str(exc.value) and "x" * 40 not in str(exc.value)
    assert read_events(str(tmp_path)) == [] and log.failures == 0


def test_short_ids_and_uuids_with_dashes_pass(tmp_path):
    log = AuditLog(str(tmp_path), clock=FakeClock())
    log.record("job.create", "acme", "k1", target="job-1", detail={"subject": "rex", "images": 2,
                                                                   "request": "3f2a-41c9-8d7e-0b1c"})
    assert read_events(str(tmp_path))[0]["detail"]["subject"] == "rex"


def test_bad_fields_are_refused(tmp_path):
    log = AuditLog(str(tmp_path))
    with pytest.raises(ValueError, match="action"):
        log.record("subject.eat", "acme", "k1")
    with pytest.raises(ValueError, match="tenant"):
        log.record("subject.create", "", "k1")
    with pytest.raises(ValueError, match="target"):
        log.record("subject.create", "acme", "k1", target=3)
    assert set(ACTIONS) >= {"subject.create", "keys.reload", "quota.refused"}


def test_cli_prints_json_lines(tmp_path, capsys):
    root = str(tmp_path)
    fill(root, FakeClock())
    capsys.readouterr()
    assert main(["audit", "--storage-root", root, "--tenant", "acme", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["request_id"] for e in events] == ["r1", "r2"]
    assert main(["audit", "--storage-root", root, "--action", "subject.eat"]) == 2


def test_cli_refuses_a_bad_day(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--storage-root", str(tmp_path), "--since", "yesterday"])
    assert exc.value.code == 2


def test_events_over_s3(s3_bucket):
    root = f"{s3_bucket}/service"
    log = fill(root, FakeClock())
    assert log.failures == 0
    events = read_events(root, tenant="acme")
    assert [e["request_id"] for e in events] == ["r1", "r2", "r4"]
    assert [e["request_id"] for e in read_events(root, since="2026-12-08")] == ["r4", None]
