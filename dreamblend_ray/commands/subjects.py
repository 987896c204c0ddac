"""`dreamblend subjects create|list|status|cancel|delete`: a client of a running service's subject API.

    dreamblend subjects create --images photos/ --class-noun dog --subject-id rex --wait
    dreamblend subjects list --status training
    dreamblend subjects status rex
    dreamblend subjects cancel rex
    dreamblend subjects delete rex --yes

``create`` uploads every PNG, JPEG and WebP file of the folders given (and the files named) as one
``multipart/form-data`` request, streamed from disk (``--image-uri`` sends storage URIs as JSON
instead); ``--wait`` then follows the training with a progress bar until the subject is ready,
failed or canceled. Results go to stdout as JSON (``list``: one id a line); a refusal of the service
is one line on stderr with its HTTP status and reason (docs/lifecycle.md lists the routes).

The API key is read as ``dreamblend serve`` reads it: ``--api-key-file`` (a mounted secret), else
``$DREAMBLEND_API_KEY``; it is sent as ``Authorization: Bearer KEY`` and never taken as an argument
(argument lists are visible to every user of the machine). Standard library only (``http.client``:
the service is reached directly, without the environment's HTTP proxy settings).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import mimetypes
import secrets
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

from dreamblend_ray.runtime import exit_codes

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_VARIABLE = "DREAMBLEND_API_KEY"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
FINAL = ("ready", "failed", "canceled")
STATUSES = ("queued", "training", "ready", "failed", "canceled")
PAGE = 200  # ids per GET /v1/subjects page (the service's maximum)
CHUNK = 1 << 20  # bytes read from an image file at a time while uploading
TRANSIENT = (502, 503, 504)  # --wait keeps polling through these (a replica restarting)
EXIT_CODES = (exit_codes.FAILED,)
EPILOG = ("For subjects, exit code 1 means the training ended failed or canceled (--wait), or the service "
          "failed (5xx) or could not be reached; 2 means the service refused the request (4xx: the line on "
          "stderr gives the status and the reason), the arguments are wrong or a delete was not confirmed.")


class ApiError(Exception):
    """The service answered with an error status (or could not be reached: ``status`` None)."""

    def __init__(self, status: int | None, detail: str):
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return exit_codes.USAGE if self.status is not None and 400 <= self.status < 500 else exit_codes.FAILED


# --------------------------------------------------------------------------------------------
# Arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"the service's base URL (default {DEFAULT_URL})")
    common.add_argument("--api-key-file", default=None,
                        help=f"file holding the API key (default: ${KEY_VARIABLE}; none when auth is off)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each HTTP answer")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_create(actions.add_parser("create", parents=[common], help="upload images and queue a training",
                                   description="upload images and queue the subject's training"))
    listing = actions.add_parser("list", parents=[common], help="the subjects' ids (default: the ready ones)")
    listing.add_argument("--status", choices=STATUSES, default=None, help="only subjects in this state")
    for name, text in (("status", "a subject's state and progress, as JSON"),
                       ("cancel", "cancel a queued or training subject")):
        actions.add_parser(name, parents=[common], help=text).add_argument("subject_id")
    delete = actions.add_parser("delete", parents=[common], help="delete a subject and everything stored for it")
    delete.add_argument("subject_id")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _add_create(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="DIR_OR_FILE",
                        help="folders (their PNG, JPEG and WebP files) and image files to upload")
    source.add_argument("--image-uri", dest="image_uris", action="append", metavar="URI",
                        help="a storage URI (or allow-listed https URL) the service reads instead; repeatable")
    parser.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    parser.add_argument("--subject-id", default=None, help="the id to create (default: the service makes one)")
    parser.add_argument("--token", default=None, help="the rare token of the instance prompt (default: sks)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the service's)")
    parser.add_argument("--method", choices=("lora", "full"), default=None, help="default: the service's")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the service's)")
    parser.add_argument("--retention-days", type=int, default=None,
                        help="delete the subject this many days after its training ends")
    parser.add_argument("--webhook-url", default=None, help="where the service POSTs the subject's state changes")
    parser.add_argument("--idempotency-key", default=None,
                        help="a retried create with the same key and body returns the same subject")
    parser.add_argument("--wait", action="store_true",
                        help="follow the training with a progress bar; exit 0 only when the subject is ready")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls with --wait")


# --------------------------------------------------------------------------------------------
# HTTP


def api_key(key_file: str | None) -> str | None:
    """The key as ``dreamblend serve`` finds it (``load_api_key``): the file when given (it must
    hold one), else ``$DREAMBLEND_API_KEY``; None when neither is set (auth off)."""
    # Deferred: serving.requests imports pydantic and pyarrow; `--help` must stay instant.
    from dreamblend_ray.serving.requests import load_api_key

    settings = SimpleNamespace(api_key_file=key_file, api_key_env=KEY_VARIABLE, auth_enabled=bool(key_file))
    try:
        return load_api_key(settings)
    except ValueError:
        raise ValueError(f"--api-key-file {key_file!r} is unreadable or empty (and ${KEY_VARIABLE} is unset)") \
            from None


def error_detail(body: bytes) -> str:
    """One line from an error body: ``detail`` as is, a 422 list as ``field: message`` parts, the
    file and rule of an upload refusal; else the start of the text."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return " ".join(body.decode("utf-8", "replace").split())[:300] or "(no body)"
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if isinstance(detail, list):
        detail = "; ".join(_issue_text(issue) for issue in detail)
    text = " ".join(str(detail if detail is not None else answer).split())
    if isinstance(answer, dict) and answer.get("rule"):
        text += f" (file {answer.get('file')!r}, rule {answer['rule']})"
    return text


def _issue_text(issue) -> str:
    if not isinstance(issue, dict):
        return str(issue)
    loc = [str(p) for p in issue.get("loc") or [] if p not in ("body", "path", "query", "header")]
    kind = str(issue.get("type", ""))
    rule = f" ({kind})" if kind.startswith("upload.") else ""
    return f"{'.'.join(loc) or 'request'}: {issue.get('msg')}{rule}"


class Client:
    """One service over HTTP (``http.client``, a connection per call): ``request`` answers
    (status, body) or raises ApiError. A streamed body is sent a chunk at a time; when the service
    answers early and closes (a 413 while the files are still going out), that answer is read."""

    def __init__(self, url: str, key: str | None, timeout: float):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"--url {url!r} is not an http(s) base URL such as {DEFAULT_URL}")
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout
        self.scheme, self.netloc, self.prefix = parsed.scheme, parsed.netloc, parsed.path.rstrip("/")

    def headers(self, extra: dict | None = None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": "dreamblend-cli"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return {**headers, **(extra or {})}

    def connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.netloc, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | Iterable[bytes] = b"",
                headers: dict | None = None) -> tuple[int, bytes]:
        connection = self.connect()
        try:
            connection.putrequest(method, self.prefix + path, skip_accept_encoding=True)
            for name, value in self.headers(headers).items():
                connection.putheader(name, value)
            if isinstance(body, bytes) and (body or method in ("POST", "PUT")):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            send(connection, [body] if isinstance(body, bytes) else body)
            response = connection.getresponse()
            status, answer = response.status, response.read()
        except OSError as exc:  # refused, reset, timed out, TLS, name resolution
            raise ApiError(None, f"cannot reach {self.url}: {exc}") from None
        finally:
            connection.close()
        if status >= 400:
            raise ApiError(status, error_detail(answer))
        return status, answer

    def json(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> dict | None:
        data = b"" if body is None else json.dumps(body).encode()
        if body is not None:
            headers = {"Content-Type": "application/json", **(headers or {})}
        _, answer = self.request(method, path, data, headers)
        return json.loads(answer) if answer else None


def send(connection: http.client.HTTPConnection, chunks: Iterable[bytes]) -> None:
    """Send the body; a service that closes the connection early has answered (read it next)."""
    try:
        for chunk in chunks:
            connection.send(chunk)
    except (BrokenPipeError, ConnectionResetError) as exc:
        logger.debug("the service closed the connection while the body was sent (%s); reading its answer", exc)


def subject_path(subject_id: str) -> str:
    return "/v1/subjects/" + urllib.parse.quote(subject_id, safe="")


# --------------------------------------------------------------------------------------------
# The multipart body, streamed from the files


def image_files(paths: list[str]) -> list[Path]:
    """The files to upload: each folder's PNG/JPEG/WebP files (sorted, not recursive), and the
    files named; ValueError when one is missing or nothing is left."""
    found: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_TYPES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"--images {name!r}: no such file or folder")
    if not found:
        raise ValueError(f"--images {' '.join(paths)}: no PNG, JPEG or WebP files there")
    return found


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _field_head(boundary: str, name: str, filename: str | None = None, kind: str | None = None) -> bytes:
    disposition = f'form-data; name="{_quoted(name)}"'
    if filename is not None:
        disposition += f'; filename="{_quoted(filename)}"'
    lines = [f"--{boundary}", f"Content-Disposition: {disposition}"]
    if kind:
        lines.append(f"Content-Type: {kind}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def content_type(path: Path) -> str:
    return IMAGE_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class Multipart:
    """A ``multipart/form-data`` body of text fields and files: its exact length is known up front,
    and iterating it reads the files a chunk at a time (no file is ever held whole in memory)."""

    def __init__(self, fields: dict[str, str], files: list[tuple[str, Path]]):
        self.boundary = "dreamblend-" + secrets.token_hex(16)
        self.fields = {name: str(value) for name, value in fields.items() if value is not None}
        self.files = files
        self.content_type = f"multipart/form-data; boundary={self.boundary}"

    def _text_parts(self) -> bytes:
        return b"".join(_field_head(self.boundary, name) + value.encode("utf-8") + b"\r\n"
                        for name, value in self.fields.items())

    def _file_head(self, name: str, path: Path) -> bytes:
        return _field_head(self.boundary, name, path.name, content_type(path))

    def _end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def __len__(self) -> int:
        files = sum(len(self._file_head(n, p)) + p.stat().st_size + 2 for n, p in self.files)
        return len(self._text_parts()) + files + len(self._end())

    def __iter__(self) -> Iterator[bytes]:
        yield self._text_parts()
        for name, path in self.files:
            yield self._file_head(name, path)
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
            yield b"\r\n"
        yield self._end()


# --------------------------------------------------------------------------------------------
# The actions


def create_fields(args: argparse.Namespace) -> dict:
    values = {"class_noun": args.class_noun, "subject_id": args.subject_id, "token": args.token,
              "webhook_url": args.webhook_url, "steps": args.steps, "method": args.method, "rank": args.rank,
              "retention_days": args.retention_days}
    return {name: value for name, value in values.items() if value is not None}


def create(client: Client, args: argparse.Namespace) -> dict:
    """POST /v1/subjects: the images as multipart (or their URIs as JSON); the 202's body."""
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    fields = create_fields(args)
    if args.image_uris:
        return client.json("POST", "/v1/subjects", {**fields, "image_uris": args.image_uris}, headers)
    files = image_files(args.images)
    body = Multipart(fields, [("images", path) for path in files])
    logger.info("uploading %d images (%d bytes) to %s", len(files), len(body), client.url)
    headers.update({"Content-Type": body.content_type, "Content-Length": str(len(body))})
    _, answer = client.request("POST", "/v1/subjects", iter(body), headers)
    return json.loads(answer)


def list_ids(client: Client, status: str | None) -> list[str]:
    """Every id in ``status`` (the service's default: ready), following the pages."""
    ids, after = [], None
    while True:
        query = {"limit": PAGE, **({"status": status} if status else {}), **({"after": after} if after else {})}
        page = client.json("GET", "/v1/subjects?" + urllib.parse.urlencode(query))
        ids += page["subjects"]
        after = page.get("next")
        if not after:
            return ids


def get_state(client: Client, subject_id: str, patience_s: float = 0.0) -> dict:
    """GET /v1/subjects/{id}; 502/503/504 and an unreachable service are retried for ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.json("GET", subject_path(subject_id))
        except ApiError as exc:
            if (exc.status is not None and exc.status not in TRANSIENT) or time.monotonic() >= deadline:
                raise
            logger.warning("%s; retrying", exc)
            time.sleep(1.0)


def describe(state: dict) -> str:
    """The bar's label: the status, and the queue position or the attempt when they matter."""
    label = f"{state['subject_id']} {state['status']}"
    if state.get("queue_position"):
        label += f" (#{state['queue_position']} in queue)"
    attempt = (state.get("progress") or {}).get("attempt") or 1
    return label + (f" (attempt {attempt})" if attempt > 1 else "")


def follow(client: Client, state: dict, interval: float, patience_s: float = 60.0) -> dict:
    """Poll the subject until it is ready, failed or canceled, drawing step/total; its last state."""
    from tqdm import tqdm

    with tqdm(total=None, unit="step", desc=describe(state), dynamic_ncols=True) as bar:
        while True:
            progress = state.get("progress") or {}
            if progress.get("total"):
                bar.total = progress["total"]
                bar.update(max(0, progress.get("step", 0) - bar.n))
            bar.set_description_str(describe(state))
            if state["status"] in FINAL:
                return state
            time.sleep(interval)
            state = get_state(client, state["subject_id"], patience_s)


def confirmed(subject_id: str) -> bool:
    """Ask on the terminal; refuse (ValueError) when there is none to ask on."""
    if not sys.stdin.isatty():
        raise ValueError("delete asks for confirmation on a terminal: pass --yes to delete without asking")
    answer = input(f"Delete subject {subject_id!r} and everything stored for it (images, checkpoints)? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def emit(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def outcome(state: dict) -> int:
    """The exit code of a followed subject: 0 when ready, else FAILED (the reason logged)."""
    if state["status"] == "ready":
        return exit_codes.OK
    reason = f": {state['error']}" if state.get("error") else ""
    logger.error("subject %s ended %s%s", state["subject_id"], state["status"], reason)
    return exit_codes.FAILED


def do_create(client: Client, args: argparse.Namespace) -> int:
    state = create(client, args)
    if args.wait:
        state = follow(client, state, args.poll_interval)
    emit(state)
    return outcome(state) if args.wait else exit_codes.OK


def do_list(client: Client, args: argparse.Namespace) -> int:
    sys.stdout.write("".join(f"{subject_id}\n" for subject_id in list_ids(client, args.status)))
    return exit_codes.OK


def do_status(client: Client, args: argparse.Namespace) -> int:
    emit(get_state(client, args.subject_id))
    return exit_codes.OK


def do_cancel(client: Client, args: argparse.Namespace) -> int:
    emit(client.json("POST", subject_path(args.subject_id) + "/cancel"))
    return exit_codes.OK


def do_delete(client: Client, args: argparse.Namespace) -> int:
    if not (args.yes or confirmed(args.subject_id)):
        logger.info("not deleted")
        return exit_codes.USAGE
    client.request("DELETE", subject_path(args.subject_id))
    logger.info("subject %s deleted", args.subject_id)
    return exit_codes.OK


ACTIONS = {"create": do_create, "list": do_list, "status": do_status, "cancel": do_cancel, "delete": do_delete}


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, api_key(args.api_key_file), args.timeout)
    try:
        return ACTIONS[args.action](client, args)
    except ApiError as exc:
        logger.error("%s", exc)
        return exc.exit_code
