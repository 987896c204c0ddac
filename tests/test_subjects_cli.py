"""`dreamblend subjects create|list|status|cancel|delete` (issue 28): the HTTP client of the subject API.

(a) Against a fake API (``http.server`` on 127.0.0.1 in a thread) that records every request: the
    multipart body parses back (``email``) to the same files and fields, the key travels as a
    Bearer header, --wait follows until a final state, the service's errors become one line and
    an exit code.
(b) Against the real FastAPI routes (uvicorn on loopback) with an in-process subject service: the
    streamed upload is accepted and stored, and the server's own refusals reach the user.
No Ray, no model: fast.
"""

import asyncio
import email.parser
import email.policy
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from dreamblend_ray.cli import build_parser
from dreamblend_ray.commands import subjects
from dreamblend_ray.runtime import exit_codes

KEY = "subjects-cli-k3y-4d6f8b0c2e4a6d8f"


def run_cli(*argv: str) -> int:
    """``dreamblend subjects ARGV`` through the real parser, without the process-wide logging setup."""
    args = build_parser().parse_args(["subjects", *argv])
    return subjects.run(args)


def state(subject_id="rex", status="queued", step=None, total=None, **extra) -> dict:
    progress = None if step is None else {"step": step, "total": total, "checkpoints": [], "attempt": 1}
    return {"subject_id": subject_id, "status": status, "progress": progress,
            "queue_position": 1 if status == "queued" else None, "created_at": "2026-12-07T00:00:00Z",
            "started_at": None, "finished_at": None, "error": None, **extra}


# ------------------------------------------------------------------------------ (a) the fake API


class FakeApi:
    """The subject routes, scripted: ``answers[(method, path)]`` is a list of (status, body) given
    in turn (the last one repeats); everything received is in ``requests``."""

    def __init__(self, key: str | None = KEY):
        self.key = key
        self.requests: list[dict] = []
        self.answers: dict[tuple[str, str], list[tuple[int, object]]] = {}

    def script(self, method: str, path: str, *answers: tuple[int, object]) -> None:
        self.answers[(method, path)] = list(answers)

    def answer(self, method: str, path: str, headers) -> tuple[int, object]:
        if self.key is not None and headers.get("Authorization") != f"Bearer {self.key}":
            return 401, {"detail": "missing or invalid API key"}
        queue = self.answers.get((method, path))
        if not queue:
            return 404, {"detail": f"no route {method} {path}"}
        return queue.pop(0) if len(queue) > 1 else queue[0]


def handler_for(api: FakeApi):
    class Handler(BaseHTTPRequestHandler):
        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            url = urlsplit(self.path)
            api.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                 "headers": dict(self.headers.items()), "body": body})
            status, answer = api.answer(self.command, url.path, self.headers)
            data = b"" if answer is None else answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = handle_any

        def log_message(self, *args):  # quiet
            pass

    return Handler


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("DREAMBLEND_API_KEY", KEY)
    api = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(api))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield api
    server.shutdown()
    server.server_close()


def parts_of(request: dict) -> list[tuple[str, str | None, str | None, bytes]]:
    """(name, filename, content type, bytes) of each part of a recorded multipart body."""
    head = f"Content-Type: {request['headers']['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request["body"])
    assert message.is_multipart() and not message.defects, message.defects
    return [(part.get_param("name", header="content-disposition"), part.get_filename(),
             part.get("Content-Type"), part.get_payload(decode=True)) for part in message.iter_parts()]


@pytest.fixture
def photos(tmp_path):
    """A folder of three images (binary content with CR/LF and dashes in it), a text file and a subfolder."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    contents = {"a.png": b"\x89PNG\r\n\x1a\n" + os.urandom(3000) + b"\r\n--x\r\n",
                "b.JPG": b"\xff\xd8\xff" + os.urandom(70_000), "c.webp": b"RIFF" + bytes(range(256)) * 9}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested" / "d.png").write_bytes(b"nested")
    return folder, contents


def test_create_streams_every_image_of_the_folder_as_multipart_with_the_key(fake, photos, capsys):
    folder, contents = photos
    created = state(queue_position=2)
    fake.script("POST", "/v1/subjects", (202, created))
    code = run_cli("create", "--url", fake.url, "--images", str(folder), "--class-noun", "dog", "--subject-id",
                   "rex", "--steps", "40", "--method", "lora", "--rank", "8", "--webhook-url",
                   "https://hooks.example/x?a=1", "--retention-days", "30", "--idempotency-key", "retry-1")
    assert code == exit_codes.OK
    assert json.loads(capsys.readouterr().out) == created
    (request,) = fake.requests
    headers = request["headers"]
    assert request["method"] == "POST" and request["path"] == "/v1/subjects"
    assert headers["Authorization"] == f"Bearer {KEY}" and headers["Idempotency-Key"] == "retry-1"
    assert re.fullmatch(r"multipart/form-data; boundary=[\w-]+", headers["Content-Type"])
    assert int(headers["Content-Length"]) == len(request["body"]) and "Transfer-Encoding" not in headers
    parts = parts_of(request)
    fields = {name: value.decode() for name, filename, _, value in parts if filename is None}
    assert fields == {"class_noun": "dog", "subject_id": "rex", "steps": "40", "method": "lora", "rank": "8",
                      "webhook_url": "https://hooks.example/x?a=1", "retention_days": "30"}
    files = [(name, filename, kind, value) for name, filename, kind, value in parts if filename is not None]
    assert files == [("images", "a.png", "image/png", contents["a.png"]),
                     ("images", "b.JPG", "image/jpeg", contents["b.JPG"]),
                     ("images", "c.webp", "image/webp", contents["c.webp"])]


def test_create_takes_files_by_name_and_image_uris_as_json(fake, photos, tmp_path, capsys):
    folder, contents = photos
    fake.script("POST", "/v1/subjects", (202, state()))
    assert run_cli("create", "--url", fake.url, "--images", str(folder / "c.webp"), str(folder / "a.png"),
                   "--class-noun", "dog") == 0
    parts = parts_of(fake.requests[-1])
    assert [(p[1], p[3]) for p in parts if p[1]] == [("c.webp", contents["c.webp"]), ("a.png", contents["a.png"])]
    assert [(p[0], p[3]) for p in parts if not p[1]] == [("class_noun", b"dog")]

    assert run_cli("create", "--url", fake.url, "--image-uri", "s3://bucket/a.png", "--image-uri",
                   "s3://bucket/b.png", "--class-noun", "dog", "--steps", "4") == 0
    request = fake.requests[-1]
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {"class_noun": "dog", "steps": 4,
                                           "image_uris": ["s3://bucket/a.png", "s3://bucket/b.png"]}


def test_create_refuses_a_folder_without_images_before_sending_anything(fake, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG, JPEG or WebP"):
        run_cli("create", "--url", fake.url, "--images", str(tmp_path / "empty"), "--class-noun", "dog")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        run_cli("create", "--url", fake.url, "--images", str(tmp_path / "absent"), "--class-noun", "dog")
    assert fake.requests == []


def test_the_key_comes_from_the_key_file_first_and_is_absent_when_none_is_set(fake, tmp_path, monkeypatch):
    fake.script("GET", "/v1/subjects/rex", (200, state()))
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    fake.key = "file-key"
    assert run_cli("status", "rex", "--url", fake.url, "--api-key-file", str(key_file)) == 0
    assert fake.requests[-1]["headers"]["Authorization"] == "Bearer file-key"

    monkeypatch.delenv("DREAMBLEND_API_KEY")
    fake.key = None
    assert run_cli("status", "rex", "--url", fake.url) == 0
    assert "Authorization" not in fake.requests[-1]["headers"]
    with pytest.raises(ValueError, match="unreadable or empty"):
        run_cli("status", "rex", "--url", fake.url, "--api-key-file", str(tmp_path / "missing"))


def test_wait_follows_the_training_until_ready(fake, photos, capsys, monkeypatch):
    monkeypatch.setattr(subjects.time, "sleep", lambda s: None)
    fake.script("POST", "/v1/subjects", (202, state(queue_position=2)))
    ready = state(status="ready", step=10, total=10, steps=[5, 10], guidance_step=5, edit_step=10)
    fake.script("GET", "/v1/subjects/rex", (200, state()), (200, state(status="training", step=0, total=10)),
                (503, {"detail": "subject storage is unavailable, retry later"}),
                (200, state(status="training", step=6, total=10)), (200, ready))
    code = run_cli("create", "--url", fake.url, "--images", str(photos[0]), "--class-noun", "dog", "--wait",
                   "--poll-interval", "0")
    assert code == exit_codes.OK
    out, err = capsys.readouterr()
    assert json.loads(out) == ready
    assert "10/10" in err and "rex ready" in err  # tqdm's bar: step/total and the status
    polls = [r for r in fake.requests if r["method"] == "GET"]
    assert len(polls) == 5 and all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in polls)


@pytest.mark.parametrize("final, error", [("failed", "training failed: CUDA out of memory"), ("canceled", None)])
def test_wait_exits_nonzero_when_the_training_does_not_end_ready(fake, photos, capsys, caplog, monkeypatch,
                                                                 final, error):
    monkeypatch.setattr(subjects.time, "sleep", lambda s: None)
    fake.script("POST", "/v1/subjects", (202, state()))
    fake.script("GET", "/v1/subjects/rex", (200, state(status="training", step=3, total=10)),
                (200, state(status=final, step=3, total=10, error=error)))
    with caplog.at_level(logging.ERROR):
        code = run_cli("create", "--url", fake.url, "--images", str(photos[0]), "--class-noun", "dog", "--wait")
    assert code == exit_codes.FAILED
    assert json.loads(capsys.readouterr().out)["status"] == final
    assert errors(caplog) == [f"subject rex ended {final}" + (f": {error}" if error else "")]


UPLOAD_RULE = {"detail": [{"loc": ["body", "images"], "msg": "tiny.png: it is 8x8 pixels; the shorter side must "
                                                             "be at least 64", "type": "upload.min_side"}]}


@pytest.mark.parametrize("status, body, code, line", [
    (409, {"detail": "subject 'rex' already exists"}, exit_codes.USAGE, "HTTP 409: subject 'rex' already exists"),
    (413, {"detail": "big.png: it is larger than the limit of 1024 bytes", "file": "big.png", "rule": "file_bytes"},
     exit_codes.USAGE,
     "HTTP 413: big.png: it is larger than the limit of 1024 bytes (file 'big.png', rule file_bytes)"),
    (422, UPLOAD_RULE, exit_codes.USAGE,
     "HTTP 422: images: tiny.png: it is 8x8 pixels; the shorter side must be at least 64 (upload.min_side)"),
    (415, {"detail": "send multipart/form-data (images) or application/json (image_uris)"}, exit_codes.USAGE,
     "HTTP 415: send multipart/form-data (images) or application/json (image_uris)"),
    (500, {"detail": "internal error"}, exit_codes.FAILED, "HTTP 500: internal error"),
    (502, b"<html>\n<body>Bad gateway</body>\n</html>", exit_codes.FAILED,
     "HTTP 502: <html> <body>Bad gateway</body> </html>"),
])
def test_the_service_errors_are_one_line_and_an_exit_code(fake, photos, capsys, caplog, status, body, code, line):
    fake.script("POST", "/v1/subjects", (status, body))
    with caplog.at_level(logging.ERROR):
        assert run_cli("create", "--url", fake.url, "--images", str(photos[0]), "--class-noun", "dog") == code
    assert errors(caplog) == [line]
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err


def test_a_wrong_key_and_an_unreachable_service(fake, caplog, monkeypatch):
    monkeypatch.setenv("DREAMBLEND_API_KEY", "wrong")
    with caplog.at_level(logging.ERROR):
        assert run_cli("list", "--url", fake.url) == exit_codes.USAGE
    assert errors(caplog) == ["HTTP 401: missing or invalid API key"]
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run_cli("status", "rex", "--url", f"http://127.0.0.1:{port}") == exit_codes.FAILED
    (message,) = errors(caplog)
    assert message.startswith(f"cannot reach http://127.0.0.1:{port}") and "\n" not in message


def test_list_follows_the_pages_and_filters_by_status(fake, capsys):
    fake.script("GET", "/v1/subjects", (200, {"subjects": ["a", "b"], "next": "b"}),
                (200, {"subjects": ["c"], "next": None}))
    assert run_cli("list", "--url", fake.url, "--status", "training") == 0
    assert capsys.readouterr().out == "a\nb\nc\n"
    first, second = fake.requests
    assert first["query"] == {"limit": ["200"], "status": ["training"]}
    assert second["query"] == {"limit": ["200"], "status": ["training"], "after": ["b"]}


def test_status_and_cancel_print_the_state(fake, capsys):
    training = state(status="training", step=4, total=10)
    fake.script("GET", "/v1/subjects/rex", (200, training))
    fake.script("POST", "/v1/subjects/rex/cancel", (202, state(status="canceled")))
    assert run_cli("status", "rex", "--url", fake.url) == 0
    assert json.loads(capsys.readouterr().out) == training
    assert run_cli("cancel", "rex", "--url", fake.url) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "canceled"
    assert [(r["method"], r["path"], r["body"]) for r in fake.requests] == [
        ("GET", "/v1/subjects/rex", b""), ("POST", "/v1/subjects/rex/cancel", b"")]


def test_delete_asks_unless_yes_and_a_missing_subject_is_an_error(fake, caplog, monkeypatch):
    fake.script("DELETE", "/v1/subjects/rex", (204, None))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal: no question, no deletion
    with pytest.raises(ValueError, match="pass --yes"):
        run_cli("delete", "rex", "--url", fake.url)
    assert fake.requests == []

    monkeypatch.setattr(subjects.sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert run_cli("delete", "rex", "--url", fake.url) == exit_codes.USAGE
    assert fake.requests == []
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert run_cli("delete", "rex", "--url", fake.url) == 0
    assert run_cli("delete", "rex", "--url", fake.url, "--yes") == 0
    assert [(r["method"], r["path"]) for r in fake.requests] == [("DELETE", "/v1/subjects/rex")] * 2

    fake.script("DELETE", "/v1/subjects/gone", (404, {"detail": "subject 'gone' not found"}))
    with caplog.at_level(logging.ERROR):
        assert run_cli("delete", "gone", "--url", fake.url, "-y") == exit_codes.USAGE
    assert errors(caplog) == ["HTTP 404: subject 'gone' not found"]


def test_subject_ids_are_quoted_into_the_path(fake, capsys):
    fake.script("GET", "/v1/subjects/a%2Fb", (200, state("a/b")))
    assert run_cli("status", "a/b", "--url", fake.url) == 0
    assert fake.requests[-1]["path"] == "/v1/subjects/a%2Fb"


def test_the_multipart_body_has_the_length_it_announces(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(os.urandom(5 * subjects.CHUNK // 2))
    body = subjects.Multipart({"class_noun": "dög", "subject_id": None}, [("images", path)])
    data = b"".join(body)
    assert len(data) == len(body) and data.endswith(f"--{body.boundary}--\r\n".encode())
    assert b'name="subject_id"' not in data and "dög".encode() in data


# ------------------------------------------------------------------------------ (b) the real routes


def errors(caplog) -> list[str]:
    """The ERROR lines logged during the test (INFO lines of other loggers may be captured too,
    depending on what configured logging before this test)."""
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def png_file(path, size, color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def served(tmp_path, monkeypatch):
    from api_fakes import InProcessScheduler, RecordingBackend, list_subjects, read_collapse_plot, serve_on_loopback
    from dreamblend_ray.serving import http
    from dreamblend_ray.serving.requests import AppArgs, SubjectNotFound

    def no_manifest(subject_id, tenant="default"):
        raise SubjectNotFound(f"subject {subject_id!r} not found")

    monkeypatch.setenv("DB_SUBJECTS_CLI_KEY", KEY)
    monkeypatch.setenv("DREAMBLEND_API_KEY", KEY)
    root = str(tmp_path / "storage")
    args = AppArgs(base="tiny", storage_root=root, auth_enabled=True, api_key_env="DB_SUBJECTS_CLI_KEY",
                   upload_max_total_bytes=200_000)
    app = http.make_api(args, RecordingBackend(), no_manifest, list_subjects, read_collapse_plot,
                        InProcessScheduler({"storage_root": root}))
    with serve_on_loopback(app) as url:
        yield url, root


def test_the_real_routes_accept_the_streamed_upload_and_store_the_images(served, tmp_path, capsys, caplog):
    url, root = served
    folder = tmp_path / "dog"
    folder.mkdir()
    png_file(folder / "1.png", (64, 80))
    Image.new("RGB", (96, 64), (10, 200, 10)).save(folder / "2.jpg", quality=90)
    Image.new("RGB", (64, 64), (10, 10, 200)).save(folder / "3.webp")
    assert run_cli("create", "--url", url, "--images", str(folder), "--class-noun", "dog", "--subject-id", "rex",
                   "--steps", "20") == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["subject_id"], created["class_noun"]) == ("rex", "dog")
    assert created["status"] in ("queued", "training")  # the in-process scheduler admits it at once
    stored = sorted(os.listdir(os.path.join(root, "subjects", "rex", "images")))
    assert stored == ["0000.png", "0001.png", "0002.png"]
    with Image.open(os.path.join(root, "subjects", "rex", "images", "0001.png")) as image:
        assert image.size == (96, 64)
    assert run_cli("status", "rex", "--url", url) == 0
    assert json.loads(capsys.readouterr().out)["status"] in ("queued", "training")

    with caplog.at_level(logging.ERROR):  # the same id again: the service's 409, as one line
        assert run_cli("create", "--url", url, "--images", str(folder), "--class-noun", "dog",
                       "--subject-id", "rex") == exit_codes.USAGE
    assert errors(caplog) == ["HTTP 409: subject 'rex' already exists"]

    assert run_cli("delete", "rex", "--url", url, "--yes") == 0
    assert not os.path.exists(os.path.join(root, "subjects", "rex"))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run_cli("status", "rex", "--url", url) == exit_codes.USAGE
    assert errors(caplog) == ["HTTP 404: subject 'rex' not found"]


@pytest.mark.parametrize("make, rule", [
    (lambda folder: png_file(folder / "tiny.png", (8, 8)), "(upload.min_side)"),
    (lambda folder: (folder / "fake.png").write_bytes(b"not an image at all"), "(upload.not_an_image)"),
])
def test_the_real_routes_refusals_name_the_file_and_the_rule(served, tmp_path, caplog, make, rule):
    url, root = served
    folder = tmp_path / "bad"
    folder.mkdir()
    png_file(folder / "good.png", (64, 64))
    make(folder)
    with caplog.at_level(logging.ERROR):
        assert run_cli("create", "--url", url, "--images", str(folder), "--class-noun", "dog",
                       "--subject-id", "bad") == exit_codes.USAGE
    (message,) = errors(caplog)
    assert message.startswith("HTTP 422: images: ") and message.endswith(rule), message
    assert not os.path.exists(os.path.join(root, "subjects", "bad"))


def test_the_real_routes_too_large_upload_is_a_413(served, tmp_path, caplog):
    url, root = served
    folder = tmp_path / "big"
    folder.mkdir()
    for k in range(3):  # ~300 kB of noise over the 200 kB limit
        Image.frombytes("RGB", (200, 170), os.urandom(200 * 170 * 3)).save(folder / f"{k}.png")
    with caplog.at_level(logging.ERROR):
        assert run_cli("create", "--url", url, "--images", str(folder), "--class-noun", "dog") == exit_codes.USAGE
    (message,) = errors(caplog)
    assert message.startswith("HTTP 413: "), message
